// Package bridge installs unwedge into a bridgev2 bridge: an encryption helper implementing
// bridgev2/matrix.Crypto on an OlmMachine whose store can be decorated, its config block, admin
// commands and metrics.
package bridge
