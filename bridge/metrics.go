package bridge

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// Metrics serves unwedge's counters in the Prometheus text exposition format (version 0.0.4),
// computed from the Unwedger's and Recovery's counters at scrape time, plus the histograms of heal
// durations and of how long recovered events waited, which it collects itself.
type Metrics struct {
	h *Helper

	// heals holds the durations of heals that ended healed (observe).
	heals *histogram
	// recovered holds how long events that waited for their keys took from their sending to
	// being bridged (observeRecovered).
	recovered *histogram

	lock   sync.Mutex
	server *http.Server
	// retry is how often a listener that could not listen tries again (metricsRetry).
	retry time.Duration
}

var healBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}

// recoveredBuckets span a recovered event's wait: seconds (a key that arrives after a restart or
// after bridgev2's own 25 s wait gave up is bridged at once; Element Web's grace period is 4 s),
// then a key that arrives minutes later (a heal, a key request answered), hours later (the
// sender's device was offline) or up to the default 7 days of unwedge.recovery.retention.
var recoveredBuckets = []float64{1, 4, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400}

func newMetrics(h *Helper) *Metrics {
	return &Metrics{h: h, heals: newHistogram(healBuckets), recovered: newHistogram(recoveredBuckets), retry: metricsRetry}
}

// observe records a heal's duration (Unwedger.OnDecision).
func (m *Metrics) observe(d unwedge.Decision) {
	if d.Action != unwedge.ActionHealed {
		return
	}
	m.heals.observe(d.Duration.Seconds())
}

// observeRecovered records how long a recovered event took from its sending (origin_server_ts,
// the sender's homeserver's clock: a negative wait counts as 0) to being bridged. A nil Metrics
// (a sink in a test) records nothing.
func (m *Metrics) observeRecovered(sent, bridged time.Time) {
	if m == nil {
		return
	}
	m.recovered.observe(max(bridged.Sub(sent), 0).Seconds())
}

// histogram is a Prometheus histogram of seconds: the count per bucket (not cumulative; write
// adds them up), their sum and how many there were.
type histogram struct {
	lock     sync.Mutex
	buckets  []float64 // upper bounds in seconds, ascending
	counts   []uint64  // per bucket, the last for +Inf
	sum      float64
	observed uint64
}

func newHistogram(buckets []float64) *histogram {
	return &histogram{buckets: buckets, counts: make([]uint64, len(buckets)+1)}
}

func (h *histogram) observe(seconds float64) {
	h.lock.Lock()
	defer h.lock.Unlock()
	h.counts[sort.SearchFloat64s(h.buckets, seconds)]++
	h.sum += seconds
	h.observed++
}

// write writes the histogram's family: its cumulative buckets, sum and count.
func (h *histogram) write(out *bufio.Writer, name, help string) {
	h.lock.Lock()
	defer h.lock.Unlock()
	family(out, name, "histogram", help)
	var cumulative uint64
	for i, bound := range h.buckets {
		cumulative += h.counts[i]
		fmt.Fprintf(out, "%s_bucket{le=\"%g\"} %d\n", name, bound, cumulative)
	}
	fmt.Fprintf(out, "%s_bucket{le=\"+Inf\"} %d\n", name, h.observed)
	fmt.Fprintf(out, "%s_sum %g\n%s_count %d\n", name, h.sum, name, h.observed)
}

// metricsRetry is how often a metrics listener that could not listen tries again.
const metricsRetry = time.Minute

// start serves /metrics on addr until stop. A metrics listener is no reason to stop bridging: when
// addr cannot be listened on (another bridge on the host has the port), the failure is logged as
// an error and the listener tries again every m.retry, while the bridge runs without
// unwedge's metrics. It returns an error only for an address that can never work.
func (m *Metrics) start(addr string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("invalid unwedge.metrics.listen %q: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m)
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	m.lock.Lock()
	m.server = server
	m.lock.Unlock()
	listener, err := net.Listen("tcp", addr)
	if err == nil {
		m.serve(server, listener)
		return nil
	}
	m.h.log.Error().Err(err).Str("address", addr).Stringer("retry_in", m.retry).
		Msg("Failed to listen for unwedge metrics (is another bridge on this host using the port? set unwedge.metrics.listen); bridging goes on without them")
	stopped := make(chan struct{})
	server.RegisterOnShutdown(func() { close(stopped) })
	go func() {
		for {
			select {
			case <-stopped:
				return
			case <-time.After(m.retry):
			}
			listener, err := net.Listen("tcp", addr)
			if err != nil {
				m.h.log.Debug().Err(err).Str("address", addr).Msg("Still failing to listen for unwedge metrics")
				continue
			}
			m.lock.Lock()
			current := m.server == server
			m.lock.Unlock()
			if !current {
				_ = listener.Close()
				return
			}
			m.serve(server, listener)
			return
		}
	}()
	return nil
}

func (m *Metrics) serve(server *http.Server, listener net.Listener) {
	go func() {
		if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.h.log.Err(err).Msg("Metrics listener stopped")
		}
	}()
	m.h.log.Info().Str("address", listener.Addr().String()).Msg("Serving unwedge metrics")
}

func (m *Metrics) stop() {
	m.lock.Lock()
	server := m.server
	m.server = nil
	m.lock.Unlock()
	if server != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(ctx)
	}
}

func (m *Metrics) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	out := bufio.NewWriter(w)
	defer out.Flush()
	m.write(r.Context(), out)
}

// write writes every metric. Families always appear (with zero values), so dashboards and alerts
// do not see series vanish.
func (m *Metrics) write(ctx context.Context, out *bufio.Writer) {
	u := m.h.unwedger
	decisions := map[unwedge.Count]int64{}
	if u != nil {
		decisions = u.Counts()
	}
	failures := olmFailures(decisions)
	heals := map[string]int64{"attempted": 0, "succeeded": 0, "failed": 0, "rate_limited": 0, "deferred": 0, "user_capped": 0, "throttled": 0, "key_conflict": 0}
	var outOfScope, unknownDevice int64
	for c, n := range decisions {
		switch c.Action {
		case unwedge.ActionHealed:
			heals["attempted"] += n
			heals["succeeded"] += n
		case unwedge.ActionFailed:
			heals["attempted"] += n
			heals["failed"] += n
		case unwedge.ActionLimited:
			heals["rate_limited"] += n
		case unwedge.ActionDeferred:
			heals["deferred"] += n
		case unwedge.ActionCapped:
			heals["user_capped"] += n
		case unwedge.ActionThrottled:
			heals["throttled"] += n
		case unwedge.ActionKeyConflict:
			heals["key_conflict"] += n
		case unwedge.ActionOutOfScope:
			outOfScope += n
		case unwedge.ActionUnknownDevice:
			unknownDevice += n
		}
	}
	family(out, "unwedge_olm_failures_total", "counter", "Olm to-device events that the bridge could not decrypt or that showed a wedge, by class.")
	labelled(out, "unwedge_olm_failures_total", "class", failures)
	family(out, "unwedge_heals_total", "counter", "Replacement Olm sessions: heals attempted, succeeded, failed, wedges not healed because of the MSC1719 limit (rate_limited), heals whose m.dummy waits for the homeserver (deferred; they end as succeeded or failed later), wedges not healed because the user's devices reached unwedge.max_heals_per_user within the interval (user_capped; left to mautrix-go's own unwedging), wedges not healed because the bridge started unwedge.max_heals_per_minute heals within the last minute (throttled; left to mautrix-go's own unwedging), and devices not healed because another device in the crypto store lists the same identity key (key_conflict).")
	labelled(out, "unwedge_heals_total", "result", heals)
	family(out, "unwedge_out_of_scope_total", "counter", "Wedged sessions of users outside unwedge.scope (left to mautrix-go's own unwedging, as with the stock bridge).")
	fmt.Fprintf(out, "unwedge_out_of_scope_total %d\n", outOfScope)
	family(out, "unwedge_unknown_device_total", "counter", "Wedges claimed by identity keys that are no device of the sender (not healed, no key claimed).")
	fmt.Fprintf(out, "unwedge_unknown_device_total %d\n", unknownDevice)

	m.heals.write(out, "unwedge_heal_duration_seconds", "Time from the heal engine taking a device up (a group of devices healed together shares its start; a resumed heal counts from its resumption) to m.dummy sent over the replacement session, for heals that ended healed.")

	recovery := map[unwedge.RecoveryCount]int64{}
	if m.h.recovery != nil {
		recovery = m.h.recovery.Counts()
	}
	events := map[string]int64{}
	for _, c := range []unwedge.RecoveryCount{unwedge.CountRecorded, unwedge.CountRecovered, unwedge.CountGivenUp, unwedge.CountDropped, unwedge.CountDecryptedStock, unwedge.CountNotRecorded} {
		events[string(c)] = recovery[c]
	}
	requests := map[string]int64{
		"sent":     recovery[unwedge.CountRequestsSent],
		"filled":   recovery[unwedge.CountRequestsFilled],
		"deferred": recovery[unwedge.CountRequestsDeferred],
	}
	family(out, "unwedge_undecryptable_events_total", "counter", "Room events without their Megolm session: recorded, recovered (bridged late), given_up (after the retention), dropped (not bridged: the sender left or was removed from the room, the event was redacted, or the device is not trusted enough), decrypted_by_bridge (bridgev2's own wait got the key), not_recorded (over a cap: max_pending_per_user, max_pending_per_room or max_pending).")
	labelled(out, "unwedge_undecryptable_events_total", "result", events)
	m.recovered.write(out, "unwedge_recovered_event_delay_seconds", "Time from a recovered room event's sending (its origin_server_ts) to its hand-over to the portal, for events bridged late by recovery (undecryptable_events_total{result=\"recovered\"}).")
	refused := map[string]int64{
		"sender": recovery[unwedge.CountFullSender],
		"room":   recovery[unwedge.CountFullRoom],
		"total":  recovery[unwedge.CountFullTotal],
	}
	family(out, "unwedge_pending_refused_total", "counter", "Room events without their Megolm session not recorded, by the cap they were over: sender (max_pending_per_user), room (max_pending_per_room), total (max_pending).")
	labelled(out, "unwedge_pending_refused_total", "cap", refused)
	family(out, "unwedge_key_requests_total", "counter", "Room key requests by recovery: sent, filled (the key arrived), deferred (the sender's session was being replaced).")
	labelled(out, "unwedge_key_requests_total", "result", requests)
	family(out, "unwedge_pending_events", "gauge", "Room events waiting for their Megolm session now (all replicas).")
	pending := -1
	if m.h.db != nil {
		if n, err := m.h.db.Pending.Count(ctx); err == nil {
			pending = n
		}
	}
	fmt.Fprintf(out, "unwedge_pending_events %d\n", pending)
	family(out, "unwedge_pending_oldest_seconds", "gauge", "Seconds since the bridge first failed to decrypt the oldest room event that still waits for its Megolm session (all replicas); 0 when none waits, -1 when the database could not be read.")
	oldest := -1.0
	if m.h.db != nil {
		if first, ok, err := m.h.db.Pending.Oldest(ctx); err == nil {
			oldest = 0
			if ok {
				oldest = max(time.Since(first), 0).Seconds()
			}
		}
	}
	fmt.Fprintf(out, "unwedge_pending_oldest_seconds %g\n", oldest)

	startup := map[string]int64{string(unwedge.ClassRolledBack): 0, string(unwedge.ClassSessionLost): 0}
	for c, n := range decisions {
		if _, ok := startup[string(c.Class)]; ok && c.Action == unwedge.ActionHealed {
			startup[string(c.Class)] += n
		}
	}
	family(out, "unwedge_startup_heals_total", "counter", "Devices healed at startup before any event was handled, by why: rolled_back (the crypto store went back in time), session_lost (no readable session with a device the bridge shared room keys with).")
	labelled(out, "unwedge_startup_heals_total", "class", startup)
	rolledBack := 0
	if report := m.h.startupReport(); report != nil && report.RolledBack() {
		rolledBack = 1
	}
	family(out, "unwedge_crypto_store_rolled_back", "gauge", "1 when this process found at startup that the crypto store had gone back in time (restored from a backup).")
	fmt.Fprintf(out, "unwedge_crypto_store_rolled_back %d\n", rolledBack)
	panics := map[string]int64{}
	for _, site := range unwedge.PanicSites() {
		panics[string(site)] = 0
	}
	dropped := map[string]int64{string(unwedge.EndpointClaim): 0, string(unwedge.EndpointQuery): 0}
	if u != nil {
		addCounts(panics, u.Panics())
		for endpoint, n := range u.AnswersDropped() {
			dropped[string(endpoint)] += n
		}
	}
	if m.h.recovery != nil {
		addCounts(panics, m.h.recovery.Panics())
	}
	if m.h.generation != nil {
		addCounts(panics, m.h.generation.Panics())
	}
	panics[string(unwedge.PanicAppserviceInbox)] += m.h.inboxPanics.Load()
	family(out, "unwedge_panics_total", "counter", "Panics recovered in unwedge's goroutines and in its calls into mautrix-go with a peer's data, by where (a heal that panicked ended as failed_permanent). Any value above zero is a bug worth reporting.")
	labelled(out, "unwedge_panics_total", "where", panics)
	family(out, "unwedge_answer_entries_dropped_total", "counter", "Entries of the homeserver's answers to the bridge's key claims and queries that named users, devices or keys the bridge did not ask for (dropped before mautrix-go read them), by endpoint.")
	labelled(out, "unwedge_answer_entries_dropped_total", "endpoint", dropped)
	history := map[string]int64{}
	for _, outcome := range unwedge.HistoryOutcomes() {
		history[string(outcome)] = 0
	}
	if u != nil {
		for outcome, n := range u.HistoryCounts() {
			history[string(outcome)] += n
		}
	}
	family(out, "unwedge_olm_history_total", "counter", "Olm messages that failed and were tried against the Olm history (unwedge.olm_history), by outcome: recovered_from_history (an earlier state of the session decrypted it: a client restored from a backup), no_state, replay_refused (the bridge had decrypted these bytes before), limited (the device tried too often), failed.")
	labelled(out, "unwedge_olm_history_total", "outcome", history)
	family(out, "unwedge_appservice_inbox_messages_total", "counter", "Encrypted to-device messages read from the bot device's inbox in appservice mode (unwedge.appservice_inbox) and handed to unwedge; those it had from a transaction already are counted here but not handled twice.")
	fmt.Fprintf(out, "unwedge_appservice_inbox_messages_total %d\n", m.h.inboxHandled.Load())
}

// olmFailures counts the Olm events that did not decrypt or showed a wedge, by class: one decision
// per event. A heal's later decisions (Resumed: a deferred heal sent at last, or a heal a stopped
// process left) are no new event, and a heal with no event behind it (forced by an admin, or
// started at startup: Class.Event) is no failure at all.
func olmFailures(decisions map[unwedge.Count]int64) map[string]int64 {
	failures := map[string]int64{}
	for c, n := range decisions {
		if c.Class.Event() && !c.Resumed {
			failures[string(c.Class)] += n
		}
	}
	return failures
}

func addCounts(sum map[string]int64, counts map[unwedge.PanicSite]int64) {
	for site, n := range counts {
		sum[string(site)] += n
	}
}

func family(out *bufio.Writer, name, kind, help string) {
	fmt.Fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
}

// labelled writes one series per label value, in a stable order.
func labelled(out *bufio.Writer, name, label string, values map[string]int64) {
	keys := make([]string, 0, len(values))
	for k := range values {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(out, "%s{%s=%q} %d\n", name, label, k, values[k])
	}
}
