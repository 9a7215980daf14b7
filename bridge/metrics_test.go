package bridge

import (
	"bufio"
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

func TestMetricsHistogram(t *testing.T) {
	m := newMetrics(&Helper{})
	for _, d := range []unwedge.Decision{
		{Action: "healed", Duration: 40 * time.Millisecond},
		{Action: "healed", Duration: 300 * time.Millisecond},
		{Action: "healed", Duration: 10 * time.Minute},
		{Action: "failed", Duration: time.Second}, // not a heal duration
		{Action: "limited"},
	} {
		m.observe(d)
	}
	var buf bytes.Buffer
	out := bufio.NewWriter(&buf)
	m.write(context.Background(), out)
	_ = out.Flush()
	text := buf.String()
	for _, want := range []string{
		`unwedge_heal_duration_seconds_bucket{le="0.05"} 1`,
		`unwedge_heal_duration_seconds_bucket{le="0.25"} 1`,
		`unwedge_heal_duration_seconds_bucket{le="0.5"} 2`,
		`unwedge_heal_duration_seconds_bucket{le="300"} 2`,
		`unwedge_heal_duration_seconds_bucket{le="+Inf"} 3`,
		`unwedge_heal_duration_seconds_count 3`,
		`unwedge_heal_duration_seconds_sum 600.34`,
		`unwedge_heals_total{result="rate_limited"} 0`, // no Unwedger: every family still appears
		`unwedge_pending_events -1`,                    // no database: unknown
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, text)
		}
	}
}
