// Command bench measures unwedge side by side with stock mautrix-go on this machine: the success
// path's decrypt throughput, heal latency on the local Synapse against its floor, a wedge storm
// of simulated devices, the heals at startup of many devices (simulated, and real devices of the
// local Synapse), and the ledger's decision at scale. It runs the Go benchmarks and tests
// of package bench and collects their figures into one table (and --json).
//
// Run it through scripts/bench.sh, which brings up Postgres and Synapse first.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/unwedge/unwedge/bench"
	"github.com/unwedge/unwedge/internal/harness"
)

// Report is the JSON the command writes; other checks read its keys.
//
// The success path figures come from runs in which stock and unwedge take turns event by event
// (package bench); each is the median over the runs of that run's figure. The ratios are stock
// time over unwedge time: "ratio" of the totals (the throughput, with every stall that hit one
// side), "paired ratio" the median of the ABBA rounds' ratios (the typical event). As medians of
// their own, a ratio need not equal the quotient of the two times beside it.
type Report struct {
	SuccessPathRatio       float64     `json:"success_path_ratio"`
	SuccessPathPairedRatio float64     `json:"success_path_paired_ratio"`
	MegolmRatio            float64     `json:"megolm_decrypt_ratio"`
	MegolmPairedRatio      float64     `json:"megolm_decrypt_paired_ratio"`
	OlmRatio               float64     `json:"olm_decrypt_ratio"`
	OlmPairedRatio         float64     `json:"olm_decrypt_paired_ratio"`
	MegolmStockNS          float64     `json:"megolm_decrypt_stock_ns"`
	MegolmUnwedgeNS        float64     `json:"megolm_decrypt_unwedge_ns"`
	OlmStockNS             float64     `json:"olm_decrypt_stock_ns"`
	OlmUnwedgeNS           float64     `json:"olm_decrypt_unwedge_ns"`
	MegolmStockAllocs      float64     `json:"megolm_decrypt_stock_allocs"`
	MegolmUnwedgeAllocs    float64     `json:"megolm_decrypt_unwedge_allocs"`
	OlmStockAllocs         float64     `json:"olm_decrypt_stock_allocs"`
	OlmUnwedgeAllocs       float64     `json:"olm_decrypt_unwedge_allocs"`
	MegolmRuns             DecryptRuns `json:"megolm_decrypt_runs"`
	OlmRuns                DecryptRuns `json:"olm_decrypt_runs"`

	HealP50ms      float64          `json:"heal_p50_ms"`
	HealP95ms      float64          `json:"heal_p95_ms"`
	FloorP50ms     float64          `json:"floor_p50_ms"`
	StockHealRatio float64          `json:"stock_heal_ratio"`
	Heal           bench.HealResult `json:"heal"`

	Storm  []bench.StormResult  `json:"storm"`
	Ledger []bench.LedgerResult `json:"ledger"`

	// Proactive is the startup heal of D devices, one by one and batched (HealBatch), on the
	// in-memory homeserver ("homeserver": "memory") and on the local Synapse ("synapse"), and
	// ProactiveRatios one-by-one over batch per homeserver and D.
	Proactive       []bench.ProactiveResult `json:"proactive"`
	ProactiveRatios []bench.ProactiveRatio  `json:"proactive_ratios"`

	// OlmHistory is what the Olm history costs on Postgres per number of sessions, for a modeled
	// week of traffic.
	OlmHistory []bench.OlmHistoryResult `json:"olm_history"`

	// Startup is the startup check at scale: per database and number of stored Olm sessions, with
	// and without a rollback, how long events waited and what the check cost (each entry in a
	// process of its own).
	Startup []bench.StartupResult `json:"startup"`
}

// DecryptRuns are one success path benchmark's ratios, run by run, to show their spread.
type DecryptRuns struct {
	Ratio       []float64 `json:"ratio"`
	PairedRatio []float64 `json:"paired_ratio"`
}

type sizes struct {
	benchRuns, benchOps, heals int
	storm, ledger, proactive   string
	proactiveSynapse, history  string
	startup, startupSQLite     string
}

func main() {
	quick := flag.Bool("quick", false, "small sizes (a minute instead of several)")
	jsonPath := flag.String("json", "", "also write the figures as JSON to this path")
	flag.Parse()
	sz := sizes{benchRuns: 6, benchOps: 400, heals: 30, storm: "200,1000", ledger: "1000,100000,1000000", proactive: "1000,10000", proactiveSynapse: "1000", history: "1000,100000",
		startup: "10000,100000,1000000", startupSQLite: "10000,100000"}
	if *quick {
		sz = sizes{benchRuns: 3, benchOps: 200, heals: 10, storm: "100", ledger: "1000,100000", proactive: "200", proactiveSynapse: "20", history: "1000",
			startup: "10000", startupSQLite: "10000"}
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	report, err := run(ctx, sz)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	printReport(os.Stdout, report)
	if *jsonPath != "" {
		data, _ := json.MarshalIndent(report, "", "  ")
		if err = os.WriteFile(*jsonPath, append(data, '\n'), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
	}
}

func run(ctx context.Context, sz sizes) (*Report, error) {
	root, err := harness.ModuleRoot()
	if err != nil {
		return nil, err
	}
	out, err := os.MkdirTemp("", "unwedge-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(out)
	report := &Report{}

	fmt.Fprintf(os.Stderr, "success path: %d runs of %d decryptions per mode, stock and unwedge taking turns...\n", sz.benchRuns, sz.benchOps)
	benchOutput, err := goTest(ctx, root, nil, "-run", "^$", "-bench", "^Benchmark(Megolm|Olm)Decrypt$",
		"-benchtime", fmt.Sprintf("%dx", sz.benchOps), "-count", strconv.Itoa(sz.benchRuns))
	if err != nil {
		return nil, err
	}
	results := parseBenchmarks(benchOutput)
	megolm, err := decryptFigures(results, "MegolmDecrypt")
	if err != nil {
		return nil, err
	}
	olm, err := decryptFigures(results, "OlmDecrypt")
	if err != nil {
		return nil, err
	}
	report.MegolmStockNS, report.MegolmUnwedgeNS = megolm.stockNS, megolm.unwedgeNS
	report.MegolmStockAllocs, report.MegolmUnwedgeAllocs = megolm.stockAllocs, megolm.unwedgeAllocs
	report.MegolmRatio, report.MegolmPairedRatio, report.MegolmRuns = megolm.ratio, megolm.pairedRatio, megolm.runs
	report.OlmStockNS, report.OlmUnwedgeNS = olm.stockNS, olm.unwedgeNS
	report.OlmStockAllocs, report.OlmUnwedgeAllocs = olm.stockAllocs, olm.unwedgeAllocs
	report.OlmRatio, report.OlmPairedRatio, report.OlmRuns = olm.ratio, olm.pairedRatio, olm.runs
	report.SuccessPathRatio = min(report.MegolmRatio, report.OlmRatio)
	report.SuccessPathPairedRatio = min(report.MegolmPairedRatio, report.OlmPairedRatio)

	fmt.Fprintf(os.Stderr, "heal latency (%d heals per mode), storm (%s devices), ledger (%s rows), proactive storm (%s devices; on Synapse %s), Olm history (%s sessions)...\n",
		sz.heals, sz.storm, sz.ledger, sz.proactive, sz.proactiveSynapse, sz.history)
	env := []string{
		"UNWEDGE_BENCH_OUT=" + out,
		"UNWEDGE_BENCH_HEALS=" + strconv.Itoa(sz.heals),
		"UNWEDGE_BENCH_STORM=" + sz.storm,
		"UNWEDGE_BENCH_LEDGER=" + sz.ledger,
		"UNWEDGE_BENCH_PROACTIVE=" + sz.proactive,
		"UNWEDGE_BENCH_PROACTIVE_SYNAPSE=" + sz.proactiveSynapse,
		"UNWEDGE_BENCH_HISTORY=" + sz.history,
		"UNWEDGE_BENCH_STARTUP=" + sz.startup,
		"UNWEDGE_BENCH_STARTUP_SQLITE=" + sz.startupSQLite,
	}
	if _, err = goTest(ctx, root, env, "-run", "^(TestHealLatency|TestStorm|TestLedgerScale|TestProactiveStorm|TestProactiveStormSynapse|TestOlmHistoryStorage|TestStartupScale)$", "-v"); err != nil {
		return nil, err
	}
	var proactiveSynapse []bench.ProactiveResult
	for name, into := range map[string]any{"heal": &report.Heal, "storm": &report.Storm, "ledger": &report.Ledger, "proactive": &report.Proactive,
		"proactive_synapse": &proactiveSynapse, "olm_history": &report.OlmHistory, "startup": &report.Startup} {
		data, err := os.ReadFile(filepath.Join(out, name+".json"))
		if err != nil {
			return nil, fmt.Errorf("no %s figures: %w", name, err)
		}
		if err = json.Unmarshal(data, into); err != nil {
			return nil, fmt.Errorf("bad %s figures: %w", name, err)
		}
	}
	report.HealP50ms, report.HealP95ms, report.FloorP50ms = report.Heal.HealP50ms, report.Heal.HealP95ms, report.Heal.FloorP50ms
	report.StockHealRatio = bench.Round(report.Heal.StockHealP50ms / report.Heal.HealP50ms)
	report.Proactive = append(report.Proactive, proactiveSynapse...)
	report.ProactiveRatios = proactiveRatios(report.Proactive)
	return report, nil
}

// proactiveRatios pairs the proactive storm's one-by-one and batch figures of each homeserver and
// D, in the order of the figures.
func proactiveRatios(results []bench.ProactiveResult) []bench.ProactiveRatio {
	type run struct {
		homeserver string
		devices    int
	}
	byMode := map[string]map[run]bench.ProactiveResult{}
	var runs []run
	for _, r := range results {
		if byMode[r.Mode] == nil {
			byMode[r.Mode] = map[run]bench.ProactiveResult{}
		}
		key := run{r.Homeserver, r.Devices}
		byMode[r.Mode][key] = r
		if !slices.Contains(runs, key) {
			runs = append(runs, key)
		}
	}
	var out []bench.ProactiveRatio
	for _, key := range runs {
		oneByOne, ok1 := byMode["one-by-one"][key]
		batch, ok2 := byMode["batch"][key]
		if ok1 && ok2 {
			out = append(out, bench.ProactiveRatios(oneByOne, batch))
		}
	}
	return out
}

// figureFiles are the files of package bench whose test log lines (their figures as they come)
// goTest shows.
var figureFiles = []string{"storm_test.go", "ledger_test.go", "heal_test.go", "proactive_test.go", "proactive_synapse_test.go", "startup_test.go"}

// goTest runs `go test` on package bench and returns its output; the output also goes to stderr
// as it comes, so a long run shows progress.
func goTest(ctx context.Context, root string, env []string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", append([]string{"test", "-tags", "goolm", "-count=1", "-timeout", "60m"}, append(args, "./bench/")...)...)
	if slices.Contains(args, "-count") {
		cmd.Args = slices.DeleteFunc(cmd.Args, func(a string) bool { return a == "-count=1" })
	}
	cmd.Dir = root
	cmd.Env = append(os.Environ(), env...)
	var buf strings.Builder
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	cmd.Stderr = os.Stderr
	if err = cmd.Start(); err != nil {
		return "", err
	}
	scanner := bufio.NewScanner(pipe)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	for scanner.Scan() {
		line := scanner.Text()
		buf.WriteString(line + "\n")
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(line, "Benchmark") || strings.Contains(line, "--- ") ||
			slices.ContainsFunc(figureFiles, func(file string) bool { return strings.HasPrefix(trimmed, file) }) {
			fmt.Fprintln(os.Stderr, "  "+strings.TrimSpace(line))
		}
	}
	if err = cmd.Wait(); err != nil {
		return buf.String(), fmt.Errorf("go test %s: %w", strings.Join(args, " "), err)
	}
	return buf.String(), nil
}

var benchLine = regexp.MustCompile(`^Benchmark(\S+?)(?:-\d+)?\s+\d+\s+(.*)$`)

// parseBenchmarks returns each benchmark's samples of each unit ("ns/op", "stock-ns/event"...),
// one per run.
func parseBenchmarks(output string) map[string]map[string][]float64 {
	out := map[string]map[string][]float64{}
	for _, line := range strings.Split(output, "\n") {
		m := benchLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		if out[m[1]] == nil {
			out[m[1]] = map[string][]float64{}
		}
		fields := strings.Fields(m[2])
		for i := 0; i+1 < len(fields); i += 2 {
			if v, err := strconv.ParseFloat(fields[i], 64); err == nil {
				out[m[1]][fields[i+1]] = append(out[m[1]][fields[i+1]], v)
			}
		}
	}
	return out
}

// decrypt is one success path benchmark's figures, each the median over the runs.
type decrypt struct {
	stockNS, unwedgeNS, stockAllocs, unwedgeAllocs, ratio, pairedRatio float64
	runs                                                               DecryptRuns
}

// decryptFigures reads the figures of one success path benchmark (bench/interleave_test.go
// names the units).
func decryptFigures(results map[string]map[string][]float64, name string) (decrypt, error) {
	samples := results[name]
	for _, unit := range []string{"stock-ns/event", "unwedge-ns/event", "stock-allocs/event", "unwedge-allocs/event", "stock/unwedge", "paired-stock/unwedge"} {
		if len(samples[unit]) == 0 {
			return decrypt{}, fmt.Errorf("no %s figures of Benchmark%s in the output of go test", unit, name)
		}
	}
	return decrypt{
		stockNS:       bench.Median(samples["stock-ns/event"]),
		unwedgeNS:     bench.Median(samples["unwedge-ns/event"]),
		stockAllocs:   bench.Median(samples["stock-allocs/event"]),
		unwedgeAllocs: bench.Median(samples["unwedge-allocs/event"]),
		ratio:         bench.Round(bench.Median(samples["stock/unwedge"])),
		pairedRatio:   bench.Round(bench.Median(samples["paired-stock/unwedge"])),
		runs:          DecryptRuns{Ratio: samples["stock/unwedge"], PairedRatio: samples["paired-stock/unwedge"]},
	}, nil
}

func printReport(w io.Writer, r *Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tstock\tunwedge\tratio (stock/unwedge time; paired: median of rounds)")
	printDecrypt(tw, "Megolm decrypt", decrypt{r.MegolmStockNS, r.MegolmUnwedgeNS, r.MegolmStockAllocs, r.MegolmUnwedgeAllocs, r.MegolmRatio, r.MegolmPairedRatio, r.MegolmRuns})
	printDecrypt(tw, "Olm decrypt (to-device)", decrypt{r.OlmStockNS, r.OlmUnwedgeNS, r.OlmStockAllocs, r.OlmUnwedgeAllocs, r.OlmRatio, r.OlmPairedRatio, r.OlmRuns})
	fmt.Fprintf(tw, "heal p50 / p95 (failure to m.dummy sent)\t%.1f / %.1f ms\t%.1f / %.1f ms\t%.3f\n",
		r.Heal.StockHealP50ms, r.Heal.StockHealP95ms, r.HealP50ms, r.HealP95ms, r.StockHealRatio)
	fmt.Fprintf(tw, "lost room key back p50 / p95\t(bridgev2 waits 3 s)\t%.1f / %.1f ms\t\n", r.Heal.RecoveredP50ms, r.Heal.RecoveredP95ms)
	fmt.Fprintf(tw, "  steps p50: detect, claim, session, send, key round trip\t\t%.1f, %.1f, %.1f, %.1f, %.1f ms\t\n",
		r.Heal.DetectP50ms, r.Heal.ClaimP50ms, r.Heal.SessionP50ms, r.Heal.SendP50ms, r.Heal.KeyRoundTripP50ms)
	fmt.Fprintf(tw, "  floor p50: claim + 2 one-way to-device\t\t%.1f + 2 x %.1f = %.1f ms\t\n", r.Heal.FloorClaimP50ms, r.Heal.FloorOneWayP50ms, r.FloorP50ms)
	_ = tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "storm\tdevices\tmessages each\tnew sessions\tkey claims\tm.room.encrypted sent\tafter restart\tseconds\tpeak RSS MB\tpeak heap MB")
	for _, s := range r.Storm {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%.1f\t%.0f\t%.0f\n", s.Mode, s.Devices, s.MessagesPerDevice, s.ReplacementSessions,
			s.ClaimedKeys, s.ToDeviceSent, s.AfterRestartSessions, s.Seconds, s.PeakRSSMB, s.PeakHeapMB)
	}
	_ = tw.Flush()
	fmt.Fprintln(w)
	printProactive(w, r)
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ledger\trows\tdecision p50\tp99\tpruned\tprune time")
	for _, l := range r.Ledger {
		fmt.Fprintf(tw, "%s\t%d\t%.0f µs\t%.0f µs\t%d\t%.0f ms\n", l.DB, l.Rows, l.P50us, l.P99us, l.Pruned, l.PruneMS)
	}
	_ = tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "Olm history (a week)	sessions	states each	pickle bytes	on disk	per session	lookup p50	hourly prune")
	for _, h := range r.OlmHistory {
		fmt.Fprintf(tw, "postgres\t%d\t%d\t%d\t%.1f MB\t%.1f kB\t%.0f µs\t%d states, %.0f ms\n", h.Sessions, h.StatesPerSessionWeek, h.PickleBytes,
			float64(h.TableBytes)/1e6, h.BytesPerSessionWeek/1e3, h.LookupP50us, h.PrunedStates, h.PruneMS)
	}
	_ = tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "startup check	sessions	rollback	to first event	events blocked max	check	heal	heals	peak RSS MB")
	for _, s := range r.Startup {
		fmt.Fprintf(tw, "%s\t%d\t%v\t%.2f s\t%.0f ms\t%.1f s\t%.1f s\t%d\t%.0f\n", s.DB, s.Sessions, s.Rollback, s.SecondsToFirstEvent,
			s.EventsBlockedMaxMS, s.CheckSeconds, s.HealSeconds, s.Heals, s.PeakRSSMB)
	}
	_ = tw.Flush()
}

// printDecrypt prints a success path benchmark's two rows: time per event and the ratios, then
// allocations per event and each run's ratio (paired ratio).
func printDecrypt(w io.Writer, name string, d decrypt) {
	fmt.Fprintf(w, "%s, per event\t%.0f µs\t%.0f µs\t%.3f (paired %.3f)\n", name, d.stockNS/1000, d.unwedgeNS/1000, d.ratio, d.pairedRatio)
	perRun := make([]string, len(d.runs.Ratio))
	for i := range perRun {
		perRun[i] = fmt.Sprintf("%.3f", d.runs.Ratio[i])
		if i < len(d.runs.PairedRatio) {
			perRun[i] += fmt.Sprintf(" (%.3f)", d.runs.PairedRatio[i])
		}
	}
	fmt.Fprintf(w, "  allocations per event; runs\t%.1f\t%.1f\t%s\n", d.stockAllocs, d.unwedgeAllocs, strings.Join(perRun, ", "))
}

// printProactive prints the proactive storm: each homeserver and D one by one and batched, and the
// ratios.
func printProactive(w io.Writer, r *Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "proactive storm (startup heal)\thomeserver\tdevices\thealed\tnew sessions\tclaim requests\tclaimed keys\tsendToDevice requests\tseconds\tms per device\tpeak RSS MB\tpeak heap MB\tallocated MB")
	for _, p := range r.Proactive {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%.1f\t%.2f\t%.0f\t%.0f\t%.0f\n", p.Mode, p.Homeserver, p.Devices, p.Healed, p.ReplacementSessions,
			p.KeyClaims, p.ClaimedKeys, p.SendRequests, p.Seconds, p.MSPerDevice, p.PeakRSSMB, p.PeakHeapMB, p.AllocMB)
	}
	for _, q := range r.ProactiveRatios {
		fmt.Fprintf(tw, "one-by-one / batch\t%s\t%d\t\t\t%.1f\t\t%.1f\t%.2f\t\t%.2f\t%.2f\t%.2f\n", q.Homeserver, q.Devices, q.KeyClaims, q.SendRequests, q.Seconds, q.PeakRSS, q.PeakHeap, q.Alloc)
	}
	_ = tw.Flush()
}
