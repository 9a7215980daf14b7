package main

import (
	"errors"
	"slices"
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
