// Package unwedge heals wedged Olm sessions between a bridge and its users' devices, following
// MSC1719 ("Olm unwedging"): when an Olm message from a device cannot be decrypted, it creates a
// replacement session with that device and sends m.dummy over it, at most once per device per
// hour across restarts and replicas, and re-requests the Megolm room keys that were lost.
//
// The flow reads in one direction: detect (classify the failure) -> limit (the ledger decides
// whether a new session may be created now) -> heal (claim a one-time key, create the session,
// send m.dummy) -> recover (re-request lost room keys, bridge the late messages).
package unwedge
