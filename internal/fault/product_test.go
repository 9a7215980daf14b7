package fault_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/fault"
	"github.com/unwedge/unwedge/internal/fault/inject"
	"github.com/unwedge/unwedge/internal/harness"
)

// faultSymbol matches the symbols of fault points and of arming them.
var faultSymbol = regexp.MustCompile(`unwedge/unwedge/internal/fault|ArmFaults|arm\w*Faults`)

// faultStrings are texts only fault injection puts in a binary.
var faultStrings = []string{
	inject.EnvVar, "Fault injection",
	unwedge.FaultHealGranted, unwedge.FaultSessionCreated, unwedge.FaultKeyArrived, unwedge.FaultEventDelivered,
}

// TestProductHasNoFaultPoints builds the bridge as the product is built (-tags goolm) and checks
// that the binary holds no fault point: no symbol of package fault or of arming it, not the
// environment variable, no point's name. The same checks find all of them in the test build
// (fault.Tag), so they do look for the right things.
func TestProductHasNoFaultPoints(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the bridge twice")
	}
	cases := []struct {
		name       string
		tags       []string
		wantFaults bool
	}{
		{"product", nil, false},
		{"test build", []string{fault.Tag}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			bin, err := harness.BuildBridge(ctx, t.TempDir(), tc.tags...)
			if err != nil {
				t.Fatal(err)
			}
			nm, err := exec.CommandContext(ctx, "go", "tool", "nm", bin).Output()
			if err != nil {
				t.Fatalf("go tool nm: %v", err)
			}
			var symbols []string
			for line := range strings.Lines(string(nm)) {
				if faultSymbol.MatchString(line) {
					symbols = append(symbols, strings.TrimSpace(line))
				}
			}
			if has := len(symbols) > 0; has != tc.wantFaults {
				t.Errorf("fault symbols %q, want some: %v", symbols, tc.wantFaults)
			}
			data, err := os.ReadFile(bin)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range faultStrings {
				if has := bytes.Contains(data, []byte(s)); has != tc.wantFaults {
					t.Errorf("binary holds %q: %v, want %v", s, has, tc.wantFaults)
				}
			}
		})
	}
}
