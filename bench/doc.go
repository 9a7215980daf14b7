// Package bench holds the performance measurements behind cmd/bench: Go benchmarks of the success
// path, which time stock mautrix-go and unwedge side by side, event by event, in the same
// process and on the same database; and tests that measure heal latency on the local Synapse, a
// wedge storm of simulated devices, and the ledger's decision at scale. With UNWEDGE_BENCH_OUT
// set the tests write their figures there as JSON, measured on Postgres; without it they run
// small and only check correctness, the storm and the ledger on SQLite when the stack does not
// run. The devices, the in-memory homeserver and the databases are internal/cryptotest's.
package bench
