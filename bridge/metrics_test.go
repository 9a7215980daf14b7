package bridge

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"maps"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

func TestMetricsHistogram(t *testing.T) {
	m := newMetrics(&Helper{})
	for _, d := range []unwedge.Decision{
		{Action: unwedge.ActionHealed, Duration: 40 * time.Millisecond},
		{Action: unwedge.ActionHealed, Duration: 300 * time.Millisecond},
		{Action: unwedge.ActionHealed, Duration: 10 * time.Minute},
		{Action: unwedge.ActionFailed, Duration: time.Second}, // not a heal duration
		{Action: unwedge.ActionLimited},
	} {
		m.observe(d)
	}
	m.observeRecovered(time.Now(), time.Now().Add(-time.Second)) // the sender's clock ahead: 0 s
	m.observeRecovered(time.Now().Add(-2*time.Hour), time.Now())
	text := writeMetrics(m)
	for _, want := range []string{
		`unwedge_heal_duration_seconds_bucket{le="0.05"} 1`,
		`unwedge_heal_duration_seconds_bucket{le="0.25"} 1`,
		`unwedge_heal_duration_seconds_bucket{le="0.5"} 2`,
		`unwedge_heal_duration_seconds_bucket{le="300"} 2`,
		`unwedge_heal_duration_seconds_bucket{le="+Inf"} 3`,
		`unwedge_heal_duration_seconds_count 3`,
		`unwedge_heal_duration_seconds_sum 600.34`,
		`unwedge_heals_total{result="rate_limited"} 0`, // no Unwedger: every family still appears
		`unwedge_heals_total{result="throttled"} 0`,
		`unwedge_pending_events -1`, // no database: unknown
		`unwedge_pending_oldest_seconds -1`,
		`unwedge_recovered_event_delay_seconds_bucket{le="10"} 1`,
		`unwedge_recovered_event_delay_seconds_bucket{le="3600"} 1`,
		`unwedge_recovered_event_delay_seconds_bucket{le="10800"} 2`,
		`unwedge_recovered_event_delay_seconds_bucket{le="+Inf"} 2`,
		`unwedge_recovered_event_delay_seconds_count 2`,
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, text)
		}
	}
}

// writeMetrics returns what the metrics endpoint serves.
func writeMetrics(m *Metrics) string {
	var buf bytes.Buffer
	out := bufio.NewWriter(&buf)
	m.write(context.Background(), out)
	_ = out.Flush()
	return buf.String()
}

// TestMetricsPortTaken: two bridges on one host with the same metrics address. The second one's
// metrics listener cannot listen; that is logged as an error and is no reason to stop the bridge
// (start returns no error), and the listener serves once the port is free.
func TestMetricsPortTaken(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := taken.Addr().String()
	var logs bytes.Buffer
	var logLock sync.Mutex
	h := &Helper{log: zerolog.New(zerolog.SyncWriter(writerFunc(func(p []byte) (int, error) {
		logLock.Lock()
		defer logLock.Unlock()
		return logs.Write(p)
	})))}
	m := newMetrics(h)
	m.retry = 50 * time.Millisecond
	if err = m.start(addr); err != nil {
		t.Fatalf("a taken metrics port stops the bridge: %v", err)
	}
	defer m.stop()
	logLock.Lock()
	text := logs.String()
	logLock.Unlock()
	if !strings.Contains(text, `"level":"error"`) || !strings.Contains(text, "Failed to listen for unwedge metrics") || !strings.Contains(text, addr) {
		t.Errorf("the taken port is not logged as an error:\n%s", text)
	}
	_ = taken.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if !strings.Contains(string(body), "unwedge_heals_total") {
				t.Errorf("metrics served on the freed port:\n%s", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics not served after the port was freed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err = newMetrics(h).start("no port"); err == nil {
		t.Error("an address without a port is accepted")
	}
}

func TestMetricsStopWhileRetrying(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := newMetrics(&Helper{log: zerolog.Nop()})
	m.retry = 20 * time.Millisecond
	if err = m.start(taken.Addr().String()); err != nil {
		t.Fatal(err)
	}
	m.stop()
	addr := taken.Addr().String()
	_ = taken.Close()
	time.Sleep(100 * time.Millisecond)
	if resp, err := http.Get("http://" + addr + "/metrics"); err == nil {
		_ = resp.Body.Close()
		t.Error("a stopped metrics listener started serving when the port was freed")
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// TestOlmFailuresCountEvents: unwedge_olm_failures_total counts Olm events, one per event. A wedge
// whose heal was deferred and later finished by ResumeHeals made two decisions (deferred, then a
// resumed healed) but is one failure; a forced heal is none. Heals still count both ends.
func TestOlmFailuresCountEvents(t *testing.T) {
	counts := map[unwedge.Count]int64{
		{Class: unwedge.ClassNoSession, Action: unwedge.ActionDeferred}:              1,
		{Class: unwedge.ClassNoSession, Action: unwedge.ActionHealed, Resumed: true}: 1,
		{Class: unwedge.ClassNoSession, Action: unwedge.ActionLimited}:               2,
		{Class: unwedge.ClassBadMAC, Action: unwedge.ActionFailed, Resumed: true}:    1,
		{Class: unwedge.ClassBadMAC, Action: unwedge.ActionDeferred}:                 1,
		{Class: unwedge.ClassForced, Action: unwedge.ActionHealed}:                   1,
		{Class: unwedge.ClassDuplicate, Action: unwedge.ActionIgnored}:               3,
	}
	got := olmFailures(counts)
	want := map[string]int64{"no_session": 3, "bad_mac": 1, "duplicate": 3}
	if !maps.Equal(got, want) {
		t.Errorf("olm failures %v, want %v", got, want)
	}
}
