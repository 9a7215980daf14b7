package bridge

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// The admin guide documents every metric, option and command, and nothing that does not exist.

func readGuide(t *testing.T) string {
	data, err := os.ReadFile("../docs/admin-guide.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
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
	var buf bytes.Buffer
	out := bufio.NewWriter(&buf)
	newMetrics(&Helper{}).write(context.Background(), out)
	_ = out.Flush()
	var served []string
	for _, line := range strings.Split(buf.String(), "\n") {
		if fields := strings.Fields(line); len(fields) == 4 && fields[1] == "TYPE" {
			served = append(served, fields[2])
		}
	}
	slices.Sort(served)
	documented := tableNames(readGuide(t), "unwedge_")
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
