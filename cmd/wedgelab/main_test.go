package main

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/lab"
)

func TestParseRules(t *testing.T) {
	cases := []struct {
		flag string
		want []testclient.Rules
		err  error
	}{
		{"mautrix", []testclient.Rules{testclient.RulesMautrix}, nil},
		{"all", lab.AllRules, nil},
		{"element-x, element-web", []testclient.Rules{testclient.RulesElementX, testclient.RulesElementWeb}, nil},
		{"element-x,element-x", []testclient.Rules{testclient.RulesElementX}, nil},
		{"element", nil, testclient.ErrUnknownRules},
		{"mautrix,all", nil, testclient.ErrUnknownRules},
	}
	for _, tc := range cases {
		t.Run(tc.flag, func(t *testing.T) {
			got, err := parseRules(tc.flag)
			if !errors.Is(err, tc.err) || !slices.Equal(got, tc.want) {
				t.Errorf("parseRules(%q) = %v, %v; want %v, %v", tc.flag, got, err, tc.want, tc.err)
			}
		})
	}
}

func TestConfigSets(t *testing.T) {
	cases := []struct {
		flag string
		path string
		want any
		ok   bool
	}{
		{"network.unwedge.startup.enabled=false", "network.unwedge.startup.enabled", false, true},
		{"network.unwedge.max_heals_per_user=3", "network.unwedge.max_heals_per_user", 3, true},
		{"network.unwedge.min_interval=1m", "network.unwedge.min_interval", "1m", true},
		{"network.unwedge.startup.enabled", "", nil, false},
		{"=false", "", nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.flag, func(t *testing.T) {
			sets := configSets{}
			err := sets.Set(tc.flag)
			if (err == nil) != tc.ok {
				t.Fatalf("Set(%q) = %v, want ok %t", tc.flag, err, tc.ok)
			}
			if tc.ok && sets[tc.path] != tc.want {
				t.Errorf("Set(%q) gave %#v at %s, want %#v", tc.flag, sets[tc.path], tc.path, tc.want)
			}
		})
	}
}

func TestParseScenarios(t *testing.T) {
	cases := []struct {
		flag string
		want []string
		ok   bool
	}{
		{"client-restored-reused-index", []string{"client-restored-reused-index"}, true},
		{"client-restored-reused-index-own, bridge-restored-from-backup",
			[]string{"client-restored-reused-index-own", "bridge-restored-from-backup"}, true},
		{"client-restored", nil, false},
		{"client-restored-reused-index,", nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.flag, func(t *testing.T) {
			got, err := parseScenarios(tc.flag)
			if (err == nil) != tc.ok {
				t.Fatalf("parseScenarios(%q) = %v, want ok %t", tc.flag, err, tc.ok)
			}
			var names []string
			for _, sc := range got {
				names = append(names, sc.Name)
			}
			if !slices.Equal(names, tc.want) {
				t.Errorf("parseScenarios(%q) = %v, want %v", tc.flag, names, tc.want)
			}
		})
	}
	all, err := parseScenarios("")
	if err != nil || len(all) != len(lab.Scenarios) {
		t.Errorf("parseScenarios(\"\") = %d scenarios, %v; want all %d", len(all), err, len(lab.Scenarios))
	}
}

// TestTableColumns: a result's row has as many columns as the header names, and shows the
// messages sent in the window beside those lost before the heal.
func TestTableColumns(t *testing.T) {
	res := &lab.Result{Name: "bridge-restored-from-backup", Mode: lab.ModeUnwedge, Rules: testclient.RulesElementX,
		Sent: 6, Bridged: 5, Lost: 1, LostBeforeHeal: 1, SentInWindow: 7, TimeToFirstBridgedMS: -1,
		FailureToFirstBridgedMS: -1, WedgedBridgedP50MS: -1, WedgedBridgedMaxMS: -1, WindowMS: -1}
	for name, got := range map[string]int{
		"row":    strings.Count(resultColumns(res), "\t") + 1,
		"header": strings.Count(modeHeader(lab.ModeUnwedge), "\t") + 1,
	} {
		if got != columns {
			t.Errorf("%s has %d columns, want %d", name, got, columns)
		}
	}
	var out strings.Builder
	sc, _ := lab.ScenarioByName(res.Name)
	report := &lab.Report{Scenarios: []*lab.Result{res}, Rules: []testclient.Rules{testclient.RulesElementX}}
	printTable(&out, report, []*lab.Scenario{sc}, []lab.Mode{lab.ModeUnwedge})
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("table:\n%s\nwant a header and one row", out.String())
	}
	header, row := strings.Split(lines[0], "  "), strings.Fields(lines[1])
	window := slices.IndexFunc(header, func(s string) bool { return strings.TrimSpace(s) == "sent in window" })
	if window < 0 || !strings.HasPrefix(lines[1], res.Name) || !slices.Contains(row, "7") {
		t.Errorf("table:\n%s\nwant the scenario's row with sent in window 7", out.String())
	}
}
