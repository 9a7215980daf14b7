// Command wedgelab runs the wedge lab (package lab) on the local stack and prints what each way
// of wedging an Olm session costs, stock mautrix-go and unwedge side by side.
//
// Run it through scripts/wedgelab.sh, which brings up Postgres and Synapse first.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"

	"gopkg.in/yaml.v3"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/lab"
)

// options are the command line's flags.
type options struct {
	quick                       bool
	jsonPath, mode, only, rules string
	k, parallel                 int
	keep                        string
	appservice                  bool
	bridgeConfig                configSets
}

func main() {
	var opts options
	flag.BoolVar(&opts.quick, "quick", false, "small K and shorter waits")
	flag.StringVar(&opts.jsonPath, "json", "", "also write the results as JSON to this path")
	flag.StringVar(&opts.mode, "mode", "both", "stock, unwedge or both")
	names := make([]string, len(lab.Scenarios))
	for i, sc := range lab.Scenarios {
		names[i] = sc.Name
	}
	flag.StringVar(&opts.only, "scenario", "", "comma-separated scenario names (default: all): "+strings.Join(names, ", "))
	flag.IntVar(&opts.k, "k", 0, "messages per phase and direction (default 10, or 3 with --quick)")
	flag.IntVar(&opts.parallel, "parallel", 0, "scenarios at once (default 2)")
	flag.StringVar(&opts.keep, "keep", "", "keep every run's bridge log, config and client files in this directory")
	flag.BoolVar(&opts.appservice, "appservice", false, "to-device events through appservice transactions instead of /sync")
	flag.StringVar(&opts.rules, "rules", "mautrix", "the key-sharing rules of the user's client, comma-separated "+
		"(mautrix, element-web, element-x), or all; every scenario runs under each")
	opts.bridgeConfig = configSets{}
	flag.Var(opts.bridgeConfig, "set", "set an option of the unwedge-mode bridge's config, as dotted.path=value "+
		"(a YAML value; repeatable), e.g. network.unwedge.startup.enabled=false to measure reactive heals alone")
	flag.Parse()

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, "wedgelab:", err)
		os.Exit(1)
	}
}

// configSets is the --set flag: config options by dotted path.
type configSets map[string]any

func (c configSets) String() string { return fmt.Sprint(map[string]any(c)) }

func (c configSets) Set(s string) error {
	path, value, ok := strings.Cut(s, "=")
	if !ok || path == "" {
		return fmt.Errorf("want dotted.path=value, got %q", s)
	}
	var parsed any
	if err := yaml.Unmarshal([]byte(value), &parsed); err != nil {
		return fmt.Errorf("value of %s: %w", path, err)
	}
	c[path] = parsed
	return nil
}

func run(ctx context.Context, opts options) error {
	cfg := lab.FullConfig()
	if opts.quick {
		cfg = lab.QuickConfig()
	}
	if opts.k > 0 {
		cfg.K = opts.k
	}
	if opts.parallel > 0 {
		cfg.Parallel = opts.parallel
	}
	if len(opts.bridgeConfig) > 0 {
		cfg.BridgeConfig = opts.bridgeConfig
	}
	cfg.Appservice = opts.appservice
	modes, err := parseModes(opts.mode)
	if err != nil {
		return err
	}
	if cfg.Rules, err = parseRules(opts.rules); err != nil {
		return err
	}
	scenarios, err := parseScenarios(opts.only)
	if err != nil {
		return err
	}
	env, err := testenv.Load()
	if err != nil {
		return err
	}
	if opts.keep != "" {
		cfg.WorkDir = opts.keep
	} else if cfg.WorkDir, err = os.MkdirTemp("", "wedgelab-"); err != nil {
		return err
	} else {
		defer os.RemoveAll(cfg.WorkDir)
	}
	if cfg.Binary, err = harness.BuildBridge(ctx, cfg.WorkDir); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "running %d scenarios under %d rule sets (K=%d, %d at a time, to-device over %s)...\n",
		len(scenarios), len(cfg.Rules), cfg.K, cfg.Parallel, map[bool]string{false: "/sync", true: "appservice transactions"}[cfg.Appservice])
	report := lab.Run(ctx, env, cfg, scenarios, modes)
	printTable(os.Stdout, report, scenarios, modes)
	if opts.jsonPath != "" {
		data, err := json.MarshalIndent(report, "", "  ")
		if err != nil {
			return err
		}
		if err = os.WriteFile(opts.jsonPath, append(data, '\n'), 0o644); err != nil {
			return err
		}
	}
	for _, res := range report.Scenarios {
		if res.Error != "" {
			return fmt.Errorf("scenario %s (%s, %s) did not complete: %s", res.Name, res.Rules, res.Mode, res.Error)
		}
	}
	return nil
}

// columns is how many columns the table has per mode: resultColumns's, and the header's.
const columns = 12

// resultColumns are a result's columns in the table, tab-separated.
func resultColumns(res *lab.Result) string {
	ms := func(v int64, none string) string {
		if v < 0 {
			return none
		}
		return fmt.Sprintf("%d ms", v)
	}
	pair := func(p50, longest int64) string {
		if longest < 0 {
			return "-"
		}
		return fmt.Sprintf("%d/%d ms", p50, longest)
	}
	return fmt.Sprintf("%d/%d\t%d\t%d\t%d\t%d/%d\t%d\t%t\t%d\t%s\t%s\t%s\t%s", res.Bridged, res.Sent, res.Lost, res.LostBeforeHeal,
		res.SentInWindow, res.RemoteDecrypted, res.RemoteSent, res.RemoteLost, res.Healed, res.ReplacementSessions,
		ms(res.TimeToFirstBridgedMS, "never"), ms(res.FailureToFirstBridgedMS, "-"), pair(res.WedgedBridgedP50MS, res.WedgedBridgedMaxMS),
		pair(res.KeyToBridgedP50MS, res.KeyToBridgedMaxMS))
}

// parseScenarios reads --scenario: scenario names separated by commas, or empty for all.
func parseScenarios(s string) ([]*lab.Scenario, error) {
	if strings.TrimSpace(s) == "" {
		return lab.Scenarios, nil
	}
	var out []*lab.Scenario
	for _, name := range strings.Split(s, ",") {
		sc, ok := lab.ScenarioByName(strings.TrimSpace(name))
		if !ok {
			return nil, fmt.Errorf("unknown scenario %q", name)
		}
		out = append(out, sc)
	}
	return out, nil
}

func parseModes(s string) ([]lab.Mode, error) {
	switch s {
	case "both":
		return []lab.Mode{lab.ModeStock, lab.ModeUnwedge}, nil
	case "stock", "unwedge":
		return []lab.Mode{lab.Mode(s)}, nil
	}
	return nil, fmt.Errorf("unknown mode %q (stock, unwedge or both)", s)
}

// parseRules reads --rules: "all", or rule set names separated by commas.
func parseRules(s string) ([]testclient.Rules, error) {
	if strings.TrimSpace(s) == "all" {
		return lab.AllRules, nil
	}
	var out []testclient.Rules
	for _, name := range strings.Split(s, ",") {
		rules, err := testclient.ParseRules(strings.TrimSpace(name))
		if err != nil {
			return nil, fmt.Errorf("--rules: %w (or all)", err)
		}
		if !slices.Contains(out, rules) {
			out = append(out, rules)
		}
	}
	return out, nil
}

// modeHeader is the table's header over one mode's columns.
func modeHeader(mode lab.Mode) string {
	return string(mode) + ": bridged\tlost\tlost before heal\tsent in window\tremote decrypted\tremote lost\thealed\t" +
		"new sessions\tfirst bridged\tfrom failure\twedged p50/max\tkey to bridged p50/max"
}

// printTable prints one row per scenario and rule set, with the modes side by side.
func printTable(out io.Writer, report *lab.Report, scenarios []*lab.Scenario, modes []lab.Mode) {
	byKey := map[string]*lab.Result{}
	for _, res := range report.Scenarios {
		byKey[res.Name+"/"+string(res.Rules)+"/"+string(res.Mode)] = res
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	header := "scenario\trules"
	for _, mode := range modes {
		header += "\t" + modeHeader(mode)
	}
	fmt.Fprintln(tw, header)
	for _, sc := range scenarios {
		for _, rules := range report.Rules {
			row := sc.Name + "\t" + string(rules)
			for _, mode := range modes {
				res, ok := byKey[sc.Name+"/"+string(rules)+"/"+string(mode)]
				switch {
				case !mode.Available():
					row += "\tnot available" + strings.Repeat("\t", columns-1)
				case !ok || res.Error != "":
					row += "\terror" + strings.Repeat("\t", columns-1)
				default:
					row += "\t" + resultColumns(res)
				}
			}
			fmt.Fprintln(tw, row)
		}
	}
	_ = tw.Flush()
	for _, res := range report.Scenarios {
		if res.Error != "" {
			fmt.Fprintf(out, "%s (%s, %s): %s\n", res.Name, res.Rules, res.Mode, res.Error)
		}
	}
}
