// Package unwedge heals wedged Olm sessions between a bridge and its users' devices, following
// MSC1719 ("Olm unwedging"): when an Olm message from a device cannot be decrypted, it creates a
// replacement session with that device and sends m.dummy over it, at most once per device per
// hour across restarts and replicas, and re-requests the Megolm room keys that were lost.
//
// The flow reads in one direction, a file a step:
//
//   - unwedge.go: the Unwedger, the middleware between the bridge's to-device transport and its
//     OlmMachine; store.go: the crypto store decorator through which it sees how each Olm event
//     ended; answers.go: the filter that cuts the homeserver's key claim and query answers to
//     what was asked (they relay other servers'); panics.go: what keeps a peer's input that
//     reaches a bug from stopping the process.
//   - detect.go: detect: parse and classify each failure (wedged or not, and why).
//   - ledger.go: limit: the ledger decides whether a device may get a new session now (MSC1719's
//     interval, leases across replicas); unwedge.go's admission adds the scope and the caps.
//   - heal.go: heal, the one engine for one device or many (a wedge, an admin's request, the
//     heals at startup, heals a stopped process left): admit, acquire the ledger's grant, claim
//     one one-time key per device, create the sessions, send m.dummy, record.
//   - history.go: recover what a client restored from a backup sends: earlier states of the Olm
//     sessions, kept by the store, decrypt the message that the current state no longer can.
//   - recovery.go: recover: the one owner of waiting for a key; waits.go: bridgev2's own wait in
//     memory; pending.go: the events kept in the database until their key comes; roomkeys.go:
//     the bridge's own room keys, answered and shared again after a heal.
//   - Before the first event, the same steps without a failed message: generation.go notices that
//     the crypto store went back in time, startup.go finds lost or unreadable sessions and lost
//     one-time keys and heals them, in the background a page at a time (events wait for the
//     first page at most); tables.go reads mautrix-go's crypto tables for both, in pages.
//   - Beside the flow: config.go, the `unwedge:` config block and its checks; lockedmap.go and
//     recent.go, the containers of the steps' state in memory (a map with its own lock, a set that
//     keeps the latest members); fault.go, the fault points that
//     only the test build (tag unwedgefault) has.
//
// The database package implements Ledger, PendingStore, SharedIndex, SharedPeers, Generations and
// OlmHistory on Postgres and SQLite.
package unwedge
