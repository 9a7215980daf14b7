package bridge

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// The Grafana dashboard and the Prometheus alerts in deploy/ name only what the metrics endpoint
// serves: its families, a histogram's series, the labels and label values of its series. A metric
// renamed in metrics.go fails here instead of leaving an empty panel or an alert that never fires.

const (
	dashboardFile  = "../deploy/grafana/unwedge.json"
	alertsFile     = "../deploy/prometheus/unwedge-alerts.yml"
	alertTestsFile = "../deploy/prometheus/unwedge-alerts_test.yml"
	// guideURL is the admin guide's public address, which the alerts' runbook_url link to.
	guideURL = "https://github.com/unwedge/unwedge/blob/main/docs/admin-guide.md"
)

var (
	// metricSelector is an unwedge metric's name with its label matchers, if any.
	metricSelector = regexp.MustCompile(`\b(unwedge_[a-z0-9_]+)(\{[^{}]*\})?`)
	labelMatcher   = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"`)
	// literalAlternatives is a regular expression that only lists label values: "a|b|c".
	literalAlternatives = regexp.MustCompile(`^[a-z0-9_]+(\|[a-z0-9_]+)*$`)
)

// metricRefs checks the unwedge metrics a text names (a PromQL expression, a panel's description,
// an alert's annotation, a test series) against the served families, and returns what is wrong:
// a name no family has, a histogram's _bucket, _sum or _count of a family that is no histogram,
// a label the family's series do not have, or a label value they never carry (a literal one, or
// each of a regular expression's literal alternatives). job and instance are Prometheus's own;
// classes are the detector's Class values (unwedge_olm_failures_total serves none before one is
// counted).
func metricRefs(text string, served map[string]*metricFamily, classes map[string]bool) []string {
	var problems []string
	for _, m := range metricSelector.FindAllStringSubmatch(text, -1) {
		name, family, suffix := m[1], served[m[1]], ""
		if family == nil {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(name, s); ok && served[base] != nil && served[base].kind == "histogram" {
					family, suffix = served[base], s
				}
			}
		}
		if family == nil {
			problems = append(problems, fmt.Sprintf("%s is not served", name))
			continue
		}
		for _, lm := range labelMatcher.FindAllStringSubmatch(m[2], -1) {
			label, op, value := lm[1], lm[2], lm[3]
			switch {
			case label == "job" || label == "instance":
				continue
			case label == "le":
				if suffix != "_bucket" {
					problems = append(problems, fmt.Sprintf("%s has no label le (only a histogram's _bucket series have)", name))
				}
				continue
			}
			values := family.labels[label]
			if values == nil && label == "class" && name == "unwedge_olm_failures_total" {
				values = classes
			}
			if values == nil {
				problems = append(problems, fmt.Sprintf("%s has no label %s", name, label))
				continue
			}
			named := []string{value}
			if op == "=~" || op == "!~" {
				if !literalAlternatives.MatchString(value) {
					continue // a pattern, not a list of values
				}
				named = strings.Split(value, "|")
			}
			for _, v := range named {
				if !values[v] {
					problems = append(problems, fmt.Sprintf("%s{%s} is never %q (it is one of %v)", name, label, v, sortedSet(values)))
				}
			}
		}
	}
	return problems
}

// TestDashboardMetricRefs: the check catches what it is for, and lets through what is served.
func TestDashboardMetricRefs(t *testing.T) {
	served := servedFamilies()
	classes := map[string]bool{"no_session": true, "bad_mac": true}
	for _, tc := range []struct {
		text string
		// caught is a part of the problem reported, or "" when the text is fine.
		caught string
	}{
		{`sum by (result) (increase(unwedge_heals_total{job=~"$job", result="failed"}[1h]))`, ""},
		{`histogram_quantile(0.9, sum by (le) (rate(unwedge_heal_duration_seconds_bucket{le="1"}[5m])))`, ""},
		{`rate(unwedge_recovered_event_delay_seconds_sum[1h]) / rate(unwedge_recovered_event_delay_seconds_count[1h])`, ""},
		{`unwedge_olm_failures_total{class=~"no_session|bad_mac"}`, ""},
		{`unwedge_heals_total{result=~".*led"}`, ""}, // a pattern: not checked
		{"the alert on unwedge_pending_oldest_seconds", ""},
		{`sum(rate(unwedge_no_such_metric[5m]))`, "unwedge_no_such_metric is not served"},
		{`unwedge_heals_total_count`, "unwedge_heals_total_count is not served"}, // not a histogram
		{`unwedge_pending_event`, "unwedge_pending_event is not served"},
		{`unwedge_heals_total{result="faild"}`, `is never "faild"`},
		{`unwedge_heals_total{result=~"throttled|capped"}`, `is never "capped"`},
		{`unwedge_olm_failures_total{class="no_sesion"}`, `is never "no_sesion"`},
		{`unwedge_pending_events{cap="room"}`, "has no label cap"},
		{`unwedge_heals_total{le="1"}`, "has no label le"},
	} {
		t.Run(tc.text, func(t *testing.T) {
			problems := metricRefs(tc.text, served, classes)
			switch {
			case tc.caught == "" && len(problems) > 0:
				t.Errorf("a served metric is reported: %v", problems)
			case tc.caught != "" && !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, tc.caught) }):
				t.Errorf("problems %v, want one with %q", problems, tc.caught)
			}
		})
	}
}

// documentStrings returns every string in a decoded JSON or YAML document.
func documentStrings(doc any) []string {
	var out []string
	switch v := doc.(type) {
	case string:
		out = append(out, v)
	case map[string]any:
		for _, child := range v {
			out = append(out, documentStrings(child)...)
		}
	case []any:
		for _, child := range v {
			out = append(out, documentStrings(child)...)
		}
	}
	return out
}

func readDashboard(t *testing.T) (raw map[string]any, dash grafanaDashboard) {
	t.Helper()
	data, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	if err = json.Unmarshal(data, &raw); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if err = json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return raw, dash
}

func readYAML(t *testing.T, path string, into any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err = yaml.Unmarshal(data, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// wedgeClasses returns the classes whose session must be replaced (Class.Wedged), and all.
func wedgeClasses(t *testing.T) (wedges, all map[string]bool) {
	all = unwedgeClasses(t)
	wedges = map[string]bool{}
	for c := range all {
		if unwedge.Class(c).Wedged() {
			wedges[c] = true
		}
	}
	return wedges, all
}

// TestDashboardMetrics: every unwedge metric that the dashboard, the alerts and the alerts' tests
// name is served, with the labels and values they name; every served family has a panel.
func TestDashboardMetrics(t *testing.T) {
	served := servedFamilies()
	_, classes := wedgeClasses(t)
	var alerts, alertTests any
	dashboard, dash := readDashboard(t)
	readYAML(t, alertsFile, &alerts)
	readYAML(t, alertTestsFile, &alertTests)
	for _, file := range []struct {
		path string
		doc  any
	}{{dashboardFile, dashboard}, {alertsFile, alerts}, {alertTestsFile, alertTests}} {
		named := map[string]bool{}
		for _, text := range documentStrings(file.doc) {
			for _, problem := range metricRefs(text, served, classes) {
				t.Errorf("%s: %s", file.path, problem)
			}
			for _, m := range metricSelector.FindAllStringSubmatch(text, -1) {
				named[m[1]] = true
			}
		}
		if len(named) < 5 {
			t.Errorf("%s names only %v", file.path, sortedSet(named))
		}
	}
	queried := map[string]bool{}
	for _, p := range dash.Panels {
		for _, target := range p.Targets {
			for _, m := range metricSelector.FindAllStringSubmatch(target.Expr, -1) {
				queried[m[1]] = true
			}
		}
	}
	var missing []string
	for name, family := range served {
		if !queried[name] && !(family.kind == "histogram" && queried[name+"_bucket"]) {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		t.Errorf("%s has no panel that queries %v", dashboardFile, missing)
	}
}

// grafanaDashboard is the part of a Grafana dashboard's JSON model the tests read.
type grafanaDashboard struct {
	SchemaVersion int `json:"schemaVersion"`
	UID           string
	Inputs        []struct {
		Name, Type, PluginID string
	} `json:"__inputs"`
	Panels []struct {
		ID         int
		Type       string
		Title      string
		Datasource *struct{ Type, UID string }
		Targets    []struct {
			Expr       string
			Datasource *struct{ Type, UID string }
		}
	}
	Templating struct {
		List []struct {
			Name       string
			Type       string
			Datasource *struct{ Type, UID string }
		}
	}
}

// TestDashboardModel: the dashboard imports as Grafana's "Import dashboard" expects a shared one
// (a Prometheus data source asked for as DS_PROMETHEUS, a job and an instance variable), every
// panel queries that data source, and every selector of an unwedge metric follows the variables.
// The wedge panel's classes are the detector's wedges (Class.Wedged).
func TestDashboardModel(t *testing.T) {
	_, dash := readDashboard(t)
	if dash.SchemaVersion < 39 || dash.UID == "" {
		t.Errorf("schemaVersion %d, uid %q; want 39 or later and a uid", dash.SchemaVersion, dash.UID)
	}
	if len(dash.Inputs) != 1 || dash.Inputs[0].Name != "DS_PROMETHEUS" || dash.Inputs[0].Type != "datasource" || dash.Inputs[0].PluginID != "prometheus" {
		t.Errorf("__inputs %+v, want the Prometheus data source DS_PROMETHEUS", dash.Inputs)
	}
	const ds = "${DS_PROMETHEUS}"
	variables := map[string]bool{}
	for _, v := range dash.Templating.List {
		variables[v.Name] = true
		if v.Type == "query" && (v.Datasource == nil || v.Datasource.UID != ds) {
			t.Errorf("variable %s does not query %s", v.Name, ds)
		}
	}
	if !variables["job"] || !variables["instance"] {
		t.Errorf("variables %v, want job and instance", sortedSet(variables))
	}
	wedges, _ := wedgeClasses(t)
	ids := map[int]bool{}
	classLists := 0
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != ds || len(p.Targets) == 0 {
			t.Errorf("panel %q: data source %+v, %d queries; want %s", p.Title, p.Datasource, len(p.Targets), ds)
		}
		for _, target := range p.Targets {
			if target.Datasource == nil || target.Datasource.UID != ds {
				t.Errorf("panel %q: a query's data source is %+v, want %s", p.Title, target.Datasource, ds)
			}
			for _, m := range metricSelector.FindAllStringSubmatch(target.Expr, -1) {
				if !strings.Contains(m[2], `job=~"$job"`) || !strings.Contains(m[2], `instance=~"$instance"`) {
					t.Errorf("panel %q: %s%s does not follow the job and instance variables", p.Title, m[1], m[2])
				}
			}
			for _, m := range regexp.MustCompile(`class=~"([^"]*)"`).FindAllStringSubmatch(target.Expr, -1) {
				classLists++
				listed := map[string]bool{}
				for _, c := range strings.Split(m[1], "|") {
					listed[c] = true
				}
				compareSets(t, "wedge classes", "crypto/unwedge (Class.Wedged)", wedges, fmt.Sprintf("panel %q", p.Title), listed)
			}
		}
	}
	if classLists == 0 {
		t.Error("no panel lists the wedge classes")
	}
}

// alertRules is the part of a Prometheus rule file the tests read.
type alertRules struct {
	Groups []struct {
		Rules []struct {
			Alert       string
			Expr        string
			Labels      map[string]string
			Annotations map[string]string
		}
	}
}

// alertTests is the part of a promtool test file the tests read.
type alertTests struct {
	RuleFiles []string `yaml:"rule_files"`
	Tests     []struct {
		AlertRuleTest []struct {
			Alertname string
			ExpAlerts []map[string]any `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	}
}

// TestDashboardAlerts: every alert has a severity, a summary, a description and a runbook_url to
// its own heading in the admin guide's Alerts section, which has a heading for each alert and no
// other; the promtool tests evaluate each alert where it fires and where it does not.
func TestDashboardAlerts(t *testing.T) {
	var rules alertRules
	readYAML(t, alertsFile, &rules)
	alerts := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				t.Errorf("a rule that is no alert: %q", r.Expr)
				continue
			}
			alerts[r.Alert] = true
			if r.Labels["severity"] == "" {
				t.Errorf("%s has no severity", r.Alert)
			}
			for _, key := range []string{"summary", "description", "runbook_url"} {
				if r.Annotations[key] == "" {
					t.Errorf("%s has no %s", r.Alert, key)
				}
			}
			if want := guideURL + "#" + strings.ToLower(r.Alert); r.Annotations["runbook_url"] != want {
				t.Errorf("%s: runbook_url %q, want %q", r.Alert, r.Annotations["runbook_url"], want)
			}
		}
	}
	if len(alerts) < 5 {
		t.Fatalf("only %d alerts: %v", len(alerts), sortedSet(alerts))
	}

	headings := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#### (\S+)$`).FindAllStringSubmatch(section(t, readGuide(t), "### Alerts"), -1) {
		headings[m[1]] = true
	}
	compareSets(t, "alerts", alertsFile, alerts, "the admin guide's Alerts headings", headings)

	var tests alertTests
	readYAML(t, alertTestsFile, &tests)
	if !slices.Equal(tests.RuleFiles, []string{"unwedge-alerts.yml"}) {
		t.Errorf("%s tests %v, want unwedge-alerts.yml", alertTestsFile, tests.RuleFiles)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, test := range tests.Tests {
		for _, eval := range test.AlertRuleTest {
			if len(eval.ExpAlerts) > 0 {
				fires[eval.Alertname] = true
			} else {
				quiet[eval.Alertname] = true
			}
		}
	}
	compareSets(t, "alerts", alertsFile, alerts, alertTestsFile+" (evaluations where it fires)", fires)
	compareSets(t, "alerts", alertsFile, alerts, alertTestsFile+" (evaluations where it does not)", quiet)
}
