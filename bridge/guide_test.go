package bridge

import (
	"bytes"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// The admin guide documents every metric, option and command, and nothing that does not exist.

func readGuide(t *testing.T) string {
	data, err := os.ReadFile("../docs/admin-guide.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// section returns the part of the guide under a heading ("## Metrics"), up to the next heading of
// the same or a higher level; it fails the test when the heading is missing.
func section(t *testing.T, guide, heading string) string {
	t.Helper()
	start := strings.Index(guide, "\n"+heading+"\n")
	if start < 0 {
		t.Fatalf("the guide has no heading %q", heading)
	}
	body := guide[start+len(heading)+2:]
	level := heading[:strings.IndexByte(heading, ' ')+1]
	for i := 1; i <= len(level)-1; i++ {
		if end := strings.Index(body, "\n"+level[:i]+" "); end >= 0 {
			body = body[:end]
		}
	}
	return body
}

// tableNames returns the first column's `code` names of the guide's table rows with a prefix.
func tableNames(guide, prefix string) []string {
	re := regexp.MustCompile("(?m)^\\| `(" + regexp.QuoteMeta(prefix) + "[a-z0-9_.]*)`(?:, `([a-z_]+)`)?")
	var names []string
	for _, m := range re.FindAllStringSubmatch(guide, -1) {
		names = append(names, m[1])
		if m[2] != "" {
			// "`unwedge.min_backoff`, `max_backoff`": the second shares the first's parent.
			names = append(names, m[1][:strings.LastIndexByte(m[1], '.')+1]+m[2])
		}
	}
	slices.Sort(names)
	return names
}

func TestGuideMetrics(t *testing.T) {
	served := sortedSet(servedMetrics())
	documented := tableNames(section(t, readGuide(t), "## Metrics"), "unwedge_")
	if len(served) < 8 {
		t.Fatalf("only %d metric families served", len(served))
	}
	if !slices.Equal(served, documented) {
		t.Errorf("served metrics %v, documented %v", served, documented)
	}
}

func TestGuideOptions(t *testing.T) {
	var doc map[string]any
	if err := yaml.Unmarshal([]byte(ExampleConfig), &doc); err != nil {
		t.Fatal(err)
	}
	var options []string
	var walk func(prefix string, node map[string]any)
	walk = func(prefix string, node map[string]any) {
		for key, value := range node {
			if child, ok := value.(map[string]any); ok {
				walk(prefix+key+".", child)
			} else {
				options = append(options, prefix+key)
			}
		}
	}
	walk("", doc)
	slices.Sort(options)
	documented := tableNames(readGuide(t), "unwedge.")
	if len(options) < 15 {
		t.Fatalf("only %d options in the example config", len(options))
	}
	if !slices.Equal(options, documented) {
		t.Errorf("example config options %v, documented %v", options, documented)
	}
}

func TestGuideCommands(t *testing.T) {
	guide := readGuide(t)
	for _, sub := range []string{"status", "pending", "heal"} {
		if !strings.Contains(commandUsage, "unwedge "+sub) || !strings.Contains(guide, "`unwedge "+sub) {
			t.Errorf("subcommand %s: in usage %v, in guide %v", sub, strings.Contains(commandUsage, "unwedge "+sub), strings.Contains(guide, "`unwedge "+sub))
		}
	}
}

// guideCommands returns the guide's command list: "unwedge status [user]" and so on.
func guideCommands(t *testing.T, guide string) []string {
	var out []string
	for _, m := range regexp.MustCompile("(?m)^- `(unwedge [a-z]+[^`]*)`:").FindAllStringSubmatch(guide, -1) {
		out = append(out, m[1])
	}
	if len(out) != 3 {
		t.Fatalf("the guide lists %d commands, want 3: %v", len(out), out)
	}
	return out
}

// The bot's help (the handler's Args), its usage reply and the guide list each subcommand with
// the same arguments.
func TestGuideCommandArguments(t *testing.T) {
	documented := guideCommands(t, readGuide(t))
	var help []string
	for _, part := range strings.Split((&Helper{}).CommandHandler().Help.Args, " | ") {
		help = append(help, "unwedge "+strings.ReplaceAll(part, "_", ""))
	}
	if !slices.Equal(help, documented) {
		t.Errorf("help arguments %q, guide %q", help, documented)
	}
	for _, cmd := range documented {
		if !strings.Contains(commandUsage, "`$cmdprefix "+cmd+"`") {
			t.Errorf("usage %q lacks %q", commandUsage, cmd)
		}
	}
}

// The log table's messages are the decisions' messages (decisionMessages in crypto/unwedge), and
// every decision has a row.
func TestGuideLogMessages(t *testing.T) {
	src, err := os.ReadFile("../crypto/unwedge/unwedge.go")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile(`(?s)var decisionMessages = map\[Action\]string\{(.*?)\n\}`).FindSubmatch(src)
	if block == nil {
		t.Fatal("decisionMessages not found")
	}
	// The actions' constants, then their messages by the constants' values.
	values := map[string]string{}
	for _, m := range regexp.MustCompile(`(Action\w+)\s+Action = "([a-z_]+)"`).FindAllSubmatch(src, -1) {
		values[string(m[1])] = string(m[2])
	}
	messages := map[string]string{}
	for _, m := range regexp.MustCompile(`(Action\w+):\s*"([^"]+)"`).FindAllSubmatch(block[1], -1) {
		value, ok := values[string(m[1])]
		if !ok {
			t.Fatalf("no constant %s", m[1])
		}
		messages[value] = string(m[2])
	}
	if len(messages) < 8 {
		t.Fatalf("only %d decision messages: %v", len(messages), messages)
	}
	guide := readGuide(t)
	rows := regexp.MustCompile("(?m)^\\| `([a-z_]+)` \\| [a-z, ]+ \\| `([^`]+)`").FindAllStringSubmatch(guide, -1)
	documented := map[string]bool{}
	for _, row := range rows {
		action, text := row[1], row[2]
		want, ok := messages[action]
		if !ok {
			continue // recovery's steps (pending, recovered, given_up) are no decisions
		}
		documented[action] = true
		if strings.HasSuffix(text, "...") {
			if !strings.HasPrefix(want, strings.TrimSuffix(text, "...")) {
				t.Errorf("guide says %s logs %q, the code %q", action, text, want)
			}
		} else if text != want {
			t.Errorf("guide says %s logs %q, the code %q", action, text, want)
		}
	}
	for action := range messages {
		if !documented[action] {
			t.Errorf("decision %s (%q) has no row in the guide's log table", action, messages[action])
		}
	}
	// The other messages the table and the text quote: in the guide and in the code.
	for _, file := range []string{"../crypto/unwedge/recovery.go", "../crypto/unwedge/waits.go", "../crypto/unwedge/heal.go", "../bridge/helper.go"} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		src = append(src, data...)
	}
	for _, msg := range []string{"Recorded undecryptable event: it will be bridged when its key arrives", "Bridged event after its key arrived late",
		"Gave up on undecryptable event: its key never arrived", "Heal still deferred", "Olm session wedged, healing",
		"Not sending key request while the sender's Olm session is being replaced", "Sent the bridge's own room key again, from the index the device had",
		"Failed to send the bridge's own room key again", "Undecryptable event not kept for recovery"} {
		if !strings.Contains(guide, "`"+msg+"`") {
			t.Errorf("the guide lacks the log message %q", msg)
		}
		if !bytes.Contains(src, []byte(`"`+msg+`"`)) {
			t.Errorf("the code no longer logs %q", msg)
		}
	}
}

// The guide's example of a startup error is what Validate says.
func TestGuideConfigError(t *testing.T) {
	cfg := unwedge.DefaultConfig()
	cfg.Recovery.Retention = time.Second
	err := cfg.Validate()
	if err == nil {
		t.Fatal("a retention of 1s is accepted")
	}
	if want := "`network." + err.Error() + "`"; !strings.Contains(readGuide(t), want) {
		t.Errorf("the guide does not quote the error %s", want)
	}
}

// The repository's example config holds the embedded block as generated (indented under
// network:), and the embedded block, which other bridges' configs carry, links to the guide by
// its public address rather than a path of this repository.
func TestExampleConfigsInSync(t *testing.T) {
	full, err := os.ReadFile("../example-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var indented strings.Builder
	for _, line := range strings.Split(strings.TrimRight(ExampleConfig, "\n"), "\n") {
		if line != "" {
			line = "    " + line
		}
		indented.WriteString(line + "\n")
	}
	if !strings.Contains(string(full), indented.String()) {
		t.Error("example-config.yaml does not hold bridge/example-config.yaml under network: (run scripts/gen-example-config.sh)")
	}
	if !strings.Contains(ExampleConfig, "https://github.com/unwedge/unwedge/blob/main/docs/admin-guide.md") {
		t.Error("the embedded example config does not link to the admin guide's public address")
	}
	if regexp.MustCompile(`(?m)[ (]docs/`).MatchString(ExampleConfig) {
		t.Error("the embedded example config names a path of this repository")
	}
}

// TestInstallDocConfig: the config block docs/install.md shows is the embedded example's.
func TestInstallDocConfig(t *testing.T) {
	doc, err := os.ReadFile("../docs/install.md")
	if err != nil {
		t.Fatal(err)
	}
	var shown map[string]any
	for _, block := range regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllStringSubmatch(string(doc), -1) {
		var parsed struct {
			Network map[string]any `yaml:"network"`
		}
		if yaml.Unmarshal([]byte(block[1]), &parsed) == nil && parsed.Network["unwedge"] != nil {
			shown = parsed.Network
		}
	}
	var example map[string]any
	if err = yaml.Unmarshal([]byte(ExampleConfig), &example); err != nil {
		t.Fatal(err)
	}
	if shown == nil {
		t.Fatal("docs/install.md shows no network.unwedge block")
	}
	if !reflect.DeepEqual(shown["unwedge"], example["unwedge"]) {
		t.Errorf("docs/install.md shows\n%v\nthe example config has\n%v", shown["unwedge"], example["unwedge"])
	}
}
