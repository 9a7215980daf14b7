package bench

import "slices"

// Median is the middle of the values (the mean of the middle two of an even count), or 0 when
// there are none.
func Median(values []float64) float64 {
	if len(values) == 0 {
		return 0
	}
	sorted := slices.Sorted(slices.Values(values))
	mid := len(sorted) / 2
	if len(sorted)%2 == 0 {
		return (sorted[mid-1] + sorted[mid]) / 2
	}
	return sorted[mid]
}

// The figures the tests of this package write for cmd/bench (UNWEDGE_BENCH_OUT).

// HealResult is the heal latency on the local Synapse, with its steps, and the floor.
type HealResult struct {
	Heals int `json:"heals"`
	// From the bridge receiving the undecryptable Olm message to m.dummy sent.
	HealP50ms float64 `json:"heal_p50_ms"`
	HealP95ms float64 `json:"heal_p95_ms"`
	// From the same moment to the lost room key back at the bridge (the message can be bridged).
	RecoveredP50ms float64 `json:"recovered_p50_ms"`
	RecoveredP95ms float64 `json:"recovered_p95_ms"`
	// Steps (p50): from receiving the message to the key claim, the claim, creating the session
	// until m.dummy goes out, sending it, and the key request round trip after the heal.
	DetectP50ms       float64 `json:"detect_p50_ms"`
	ClaimP50ms        float64 `json:"claim_p50_ms"`
	SessionP50ms      float64 `json:"session_p50_ms"`
	SendP50ms         float64 `json:"send_p50_ms"`
	KeyRoundTripP50ms float64 `json:"key_round_trip_p50_ms"`
	// The floor: one key claim plus one to-device round trip (two one-way trips), measured alone.
	FloorClaimP50ms  float64 `json:"floor_claim_p50_ms"`
	FloorOneWayP50ms float64 `json:"floor_one_way_p50_ms"`
	FloorP50ms       float64 `json:"floor_p50_ms"`
	// mautrix-go's built-in unwedge on the same wedge: receiving the message to m.dummy sent.
	StockHealP50ms float64 `json:"stock_heal_p50_ms"`
	StockHealP95ms float64 `json:"stock_heal_p95_ms"`
}

// StormResult is one storm's figures (cmd/bench's "storm" list).
type StormResult struct {
	Mode                 string  `json:"mode"`
	Devices              int     `json:"devices"`
	MessagesPerDevice    int     `json:"messages_per_device"`
	ReplacementSessions  int64   `json:"replacement_sessions"`
	KeyClaims            int64   `json:"key_claims"`
	ClaimedKeys          int64   `json:"claimed_keys"`
	ToDeviceSent         int64   `json:"to_device_sent"`
	AfterRestartSessions int64   `json:"after_restart_sessions"`
	Seconds              float64 `json:"seconds"`
	PeakRSSMB            float64 `json:"peak_rss_mb"`
	PeakHeapMB           float64 `json:"peak_heap_mb"`
}

// LedgerResult is the MSC1719 decision's latency with rows devices in the ledger.
type LedgerResult struct {
	DB        string  `json:"db"`
	Rows      int     `json:"rows"`
	Decisions int     `json:"decisions"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	Pruned    int64   `json:"pruned"`
	PruneMS   float64 `json:"prune_ms"`
}

// OlmHistoryResult is what the Olm history (unwedge.olm_history) costs on Postgres for Sessions
// sessions over a week: StatesPerSessionWeek states each (measured on a real session under a
// modeled week of traffic), of PickleBytes each; the table's size on disk with its indexes, a
// lookup of one device's states (what a failed Olm message costs) and the hourly prune.
type OlmHistoryResult struct {
	Sessions             int     `json:"sessions"`
	StatesPerSessionWeek int     `json:"states_per_session_week"`
	States               int     `json:"states"`
	PickleBytes          int     `json:"pickle_bytes"`
	TableBytes           int64   `json:"table_bytes"`
	BytesPerSessionWeek  float64 `json:"bytes_per_session_week"`
	FillSeconds          float64 `json:"fill_seconds"`
	LookupP50us          float64 `json:"lookup_p50_us"`
	PrunedStates         int64   `json:"pruned_states"`
	PruneMS              float64 `json:"prune_ms"`
}

// ProactiveResult is one proactive storm's figures (cmd/bench's "proactive" list): the bridge
// heals all D devices at startup, in a mode ("batch": HealBatch; "one-by-one": Heal per device),
// through a homeserver (HomeserverMemory or HomeserverSynapse).
type ProactiveResult struct {
	Homeserver          string `json:"homeserver"`
	Mode                string `json:"mode"`
	Devices             int    `json:"devices"`
	Healed              int    `json:"healed"`
	ReplacementSessions int64  `json:"replacement_sessions"`
	// KeyClaims and SendRequests are HTTP requests (/keys/claim, /sendToDevice with
	// m.room.encrypted); ClaimedKeys and ToDeviceSent what they carried.
	KeyClaims    int64   `json:"key_claims"`
	ClaimedKeys  int64   `json:"claimed_keys"`
	SendRequests int64   `json:"send_to_device_requests"`
	ToDeviceSent int64   `json:"to_device_sent"`
	Seconds      float64 `json:"seconds"`
	// MSPerDevice is Seconds over Devices, in milliseconds.
	MSPerDevice float64 `json:"ms_per_device"`
	// Peaks of the process while it heals (its RSS peak reset before), its heap before (mostly
	// the simulated devices), and what the heals allocated in all.
	PeakRSSMB  float64 `json:"peak_rss_mb"`
	PeakHeapMB float64 `json:"peak_heap_mb"`
	BaseHeapMB float64 `json:"base_heap_mb"`
	AllocMB    float64 `json:"alloc_mb"`
}

// The homeservers of the proactive storm: the crypto test kit's, in the same process, and the
// local Synapse.
const (
	HomeserverMemory  = "memory"
	HomeserverSynapse = "synapse"
)

// ProactiveRatio is one-by-one over batch for one homeserver and D: how many times the seconds,
// the requests and the peak memory of the one-by-one heals are those of the batch.
type ProactiveRatio struct {
	Homeserver   string  `json:"homeserver"`
	Devices      int     `json:"devices"`
	Seconds      float64 `json:"seconds_ratio"`
	KeyClaims    float64 `json:"key_claims_ratio"`
	SendRequests float64 `json:"send_to_device_requests_ratio"`
	PeakRSS      float64 `json:"peak_rss_ratio"`
	PeakHeap     float64 `json:"peak_heap_ratio"`
	Alloc        float64 `json:"alloc_ratio"`
}

// ProactiveRatios compares the one-by-one heals of D devices with the batch of the same D, on the
// same homeserver.
func ProactiveRatios(oneByOne, batch ProactiveResult) ProactiveRatio {
	ratio := func(a, b float64) float64 {
		if b == 0 {
			return 0
		}
		return Round(a / b)
	}
	return ProactiveRatio{
		Homeserver:   batch.Homeserver,
		Devices:      batch.Devices,
		Seconds:      ratio(oneByOne.Seconds, batch.Seconds),
		KeyClaims:    ratio(float64(oneByOne.KeyClaims), float64(batch.KeyClaims)),
		SendRequests: ratio(float64(oneByOne.SendRequests), float64(batch.SendRequests)),
		PeakRSS:      ratio(oneByOne.PeakRSSMB, batch.PeakRSSMB),
		PeakHeap:     ratio(oneByOne.PeakHeapMB, batch.PeakHeapMB),
		Alloc:        ratio(oneByOne.AllocMB, batch.AllocMB),
	}
}

// StartupResult is one entry of the startup check at scale (cmd/bench's "startup" list): a bridge
// with Sessions stored Olm sessions starts on DB, after a rollback (every device healed, at most
// 100,000) or not, while a message arrives every 100 ms. Measured in a process of its own.
type StartupResult struct {
	DB       string `json:"db"`
	Sessions int    `json:"sessions"`
	Rollback bool   `json:"rollback"`
	// SecondsToFirstEvent is from the start until events are handled; EventsBlockedMaxMS the
	// longest a message that arrived meanwhile waited until it was handled.
	SecondsToFirstEvent float64 `json:"seconds_to_first_event"`
	EventsBlockedMaxMS  float64 `json:"events_blocked_max_ms"`
	// CheckSeconds is the time the check spent reading the tables, HealSeconds in the heal
	// engine, TotalSeconds from the start until both ended (in the background).
	CheckSeconds float64 `json:"check_seconds"`
	HealSeconds  float64 `json:"heal_seconds"`
	TotalSeconds float64 `json:"total_seconds"`
	PeakRSSMB    float64 `json:"peak_rss_mb"`
	Heals        int     `json:"heals"`
	Healed       int     `json:"healed"`
	FillSeconds  float64 `json:"fill_seconds"`
	// BaseHeapMB is the Go heap in use when the start began (the bridge's process: the fill and
	// the test's in-memory homeserver are in the parent), PeakHeapMB the largest it was during the
	// start: what the start itself held is the difference.
	BaseHeapMB float64 `json:"base_heap_mb"`
	PeakHeapMB float64 `json:"peak_heap_mb"`
}

// Round rounds a figure to three decimals, as the bench's JSON gives ratios and per-device times.
func Round(v float64) float64 { return float64(int(v*1000+0.5)) / 1000 }
