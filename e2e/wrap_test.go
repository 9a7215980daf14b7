package e2e

import (
	"context"
	"database/sql"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/bridge"
	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestWrap runs cmd/echobridge, a bridge whose network connector (internal/echo) has a config
// of its own and imports nothing from this repository. unwedge is installed by two lines added
// to its main.go, the import of bridge and `bridge.Wrap(&m)`, and nothing in the connector. One
// bridge process, restarted, shows on the real stack:
//   - config: -e writes network.unwedge next to the connector's options; at start the upgrader
//     keeps the values a user set (the connector's and unwedge's), adds the keys the config
//     lacks and saves them, and after a restart unwedge still runs with the user's values;
//   - a wedge is healed: the bridge loses its Olm session with the user's device, and the
//     message the user sends next is still echoed, with a "healed" heal in the ledger;
//   - a bad unwedge option stops the bridge at start like any config error;
//   - with unwedge.enabled: false the bridge runs mautrix-go's own helper: no "Installed unwedge"
//     log line, and no unwedge tables.
func TestWrap(t *testing.T) {
	t.Parallel()
	env := testenv.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin, err := harness.BuildBinary(ctx, dir, "./cmd/echobridge", "echobridge")
	if err != nil {
		t.Fatal(err)
	}

	// -e: the example has the connector's options and every key of unwedge's block.
	examplePath := filepath.Join(dir, "example-config.yaml")
	if out, err := exec.CommandContext(ctx, bin, "-e", "-c", examplePath).CombinedOutput(); err != nil {
		t.Fatalf("-e failed: %v\n%s", err, out)
	}
	example := readYAML(t, examplePath)
	if v := yamlAt(example, "network", "prefix"); v == nil || v.Value != "echo: " {
		t.Errorf("example network.prefix = %v, want the connector's default", v)
	}
	var unwedgeExample yaml.Node
	if err = yaml.Unmarshal([]byte(bridge.ExampleConfig), &unwedgeExample); err != nil {
		t.Fatal(err)
	}
	for _, key := range leafPaths(yamlAt(&unwedgeExample, "unwedge"), nil) {
		if yamlAt(example, append([]string{"network", "unwedge"}, key...)...) == nil {
			t.Errorf("example has no network.unwedge.%s", strings.Join(key, "."))
		}
	}

	// A config in which the user set values and that lacks keys, as an old one would.
	slot, release, err := harness.AcquireSlot(ctx, env.SlotsDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	br, err := harness.NewBridge(harness.BridgeOptions{
		Binary: bin, Dir: filepath.Join(dir, "bridge"), HomeserverURL: env.HomeserverURL, Domain: env.Domain,
		Slot: slot, DatabaseType: "postgres", DatabaseURI: env.NewDatabase(t),
		ExampleConfig: examplePath, SaveConfig: true,
		Config: map[string]any{
			// mxmain's example leaves end-to-bridge encryption off.
			"encryption.allow":             true,
			"encryption.default":           true,
			"network.prefix":               "echo> ",
			"network.unwedge.min_interval": "2h",
			"network.unwedge.scope":        "logged_in",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	dropKeys(t, br.ConfigPath, []string{"network", "unwedge", "max_retries"}, []string{"network", "unwedge", "recovery"})
	if _, err = br.ClearBotDevices(ctx); err != nil {
		t.Fatal(err)
	}
	if err = br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	stopOnCleanup(t, br)
	installed := []string{"Installed unwedge encryption helper", `"scope":"logged_in"`, `"min_interval":"2h0m0s"`}
	waitLogLine(t, ctx, br, 0, installed...)
	saved := readYAML(t, br.ConfigPath)
	for _, c := range []struct{ path, want string }{
		{"network.prefix", "echo> "},
		{"network.unwedge.min_interval", "2h"},
		{"network.unwedge.scope", "logged_in"},
		{"network.unwedge.max_retries", "6"},
		{"network.unwedge.recovery.retention", "168h"},
	} {
		if v := yamlAt(saved, strings.Split(c.path, ".")...); v == nil || v.Value != c.want {
			t.Errorf("saved config %s = %v, want %q", c.path, v, c.want)
		}
	}

	// The echo network works through the bridge, encrypted, with the connector's own prefix.
	user, err := testclient.New(ctx, testclient.Options{
		HomeserverURL: env.HomeserverURL, Username: testenv.UniqueName("alice"), Password: "correct horse battery",
		DataDir: t.TempDir(), Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = user.Close() })
	step, err := br.LoginFlow(ctx, user.UserID(), "echo", map[string]string{"name": testenv.UniqueName("echo")})
	if err != nil {
		t.Fatal(err)
	}
	_, roomText, _ := strings.Cut(step.Instructions, "your echo room is ")
	room := id.RoomID(roomText)
	if err = user.WaitForJoin(ctx, room); err != nil {
		t.Fatal(err)
	}
	echoRoundTrip(t, ctx, user, room, "echo> ", "hello before the wedge")

	// The wedge: the bridge loses its Olm session with the user's device; the user's next room
	// key crosses the broken session. The restarted bridge reads the config it saved.
	db, err := sql.Open("postgres", br.Opts.DatabaseURI)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	offset := restartWith(t, ctx, br, func() {
		if _, err := db.ExecContext(ctx, "DELETE FROM crypto_olm_session WHERE sender_key = $1", user.IdentityKey()); err != nil {
			t.Fatal(err)
		}
	})
	waitLogLine(t, ctx, br, offset, installed...)
	if err = user.RotateRoomKey(ctx, room); err != nil {
		t.Fatal(err)
	}
	echoRoundTrip(t, ctx, user, room, "echo> ", "sent while wedged")
	var healed int
	if err = db.QueryRowContext(ctx, "SELECT COUNT(*) FROM unwedge_heal WHERE outcome = 'healed' AND user_id = $1", user.UserID()).Scan(&healed); err != nil || healed == 0 {
		t.Errorf("%d healed heals of %s in the ledger (%v), want at least 1", healed, user.UserID(), err)
	}

	// A bad unwedge option is a config error: the bridge does not start.
	if err = br.Stop(); err != nil {
		t.Fatal(err)
	}
	if err = br.SetConfig(map[string]any{"network.unwedge.min_interval": "0s"}); err != nil {
		t.Fatal(err)
	}
	offset = logSize(br)
	if err = br.Start(ctx); err == nil {
		t.Fatal("the bridge started with network.unwedge.min_interval: 0s")
	}
	waitLogLine(t, ctx, br, offset, "Configuration error", "unwedge.min_interval must be positive")

	// unwedge disabled: mautrix-go's own helper, and unwedge touches nothing (its tables are
	// dropped first to show it does not create them).
	br.Opts.Stock = true
	if err = br.SetConfig(map[string]any{"network.unwedge.min_interval": "2h"}); err != nil {
		t.Fatal(err)
	}
	dropUnwedgeTables(t, ctx, db)
	offset = logSize(br)
	if err = br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitLogLine(t, ctx, br, offset, "Initializing end-to-bridge encryption...")
	echoRoundTrip(t, ctx, user, room, "echo> ", "hello from the stock bridge")
	if data, _ := os.ReadFile(br.LogPath); strings.Contains(string(data[offset:]), "Installed unwedge") || strings.Contains(string(data[offset:]), "with unwedge") {
		t.Error("unwedge was installed with network.unwedge.enabled: false")
	}
	if tables := unwedgeTables(t, ctx, db); len(tables) != 0 {
		t.Errorf("unwedge tables with unwedge disabled: %v", tables)
	}
}

// echoRoundTrip sends text and waits for the echo ghost's encrypted answer.
func echoRoundTrip(t *testing.T, ctx context.Context, user *testclient.Client, room id.RoomID, prefix, text string) {
	t.Helper()
	sent := time.Now()
	if _, err := user.SendText(ctx, room, text); err != nil {
		t.Fatal(err)
	}
	evt, err := user.WaitForMessage(ctx, room, func(evt *event.Event) bool {
		return evt.Sender != user.UserID() && evt.Content.AsMessage().Body == prefix+text
	})
	if err != nil {
		t.Fatalf("%q was not echoed: %v", text, err)
	}
	if !evt.Mautrix.WasEncrypted {
		t.Errorf("the echo of %q was not encrypted", text)
	}
	t.Logf("%q echoed by %s after %s", text, evt.Sender, time.Since(sent).Round(time.Millisecond))
}

// restartWith stops the bridge, runs change, starts it again and returns the log offset from
// which the new process writes.
func restartWith(t *testing.T, ctx context.Context, br *harness.Bridge, change func()) int {
	t.Helper()
	if err := br.Stop(); err != nil {
		t.Fatal(err)
	}
	change()
	offset := logSize(br)
	if err := br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return offset
}

func logSize(br *harness.Bridge) int {
	info, err := os.Stat(br.LogPath)
	if err != nil {
		return 0
	}
	return int(info.Size())
}

// waitLogLine waits until the bridge logged, after offset, a line that contains all of substrs.
func waitLogLine(t *testing.T, ctx context.Context, br *harness.Bridge, offset int, substrs ...string) {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		if data, err := os.ReadFile(br.LogPath); err == nil && len(data) > offset && hasLine(data[offset:], substrs) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the bridge did not log %q: %v; log:\n%s", substrs, ctx.Err(), br.LogTail(40))
		case <-deadline:
			t.Fatalf("the bridge did not log %q within a minute; log:\n%s", substrs, br.LogTail(40))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func unwedgeTables(t *testing.T, ctx context.Context, db *sql.DB) []string {
	t.Helper()
	rows, err := db.QueryContext(ctx, `SELECT table_name FROM information_schema.tables
		WHERE table_schema = current_schema() AND table_name LIKE 'unwedge\_%'`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var tables []string
	for rows.Next() {
		var name string
		if err = rows.Scan(&name); err != nil {
			t.Fatal(err)
		}
		tables = append(tables, name)
	}
	if err = rows.Err(); err != nil {
		t.Fatal(err)
	}
	return tables
}

func dropUnwedgeTables(t *testing.T, ctx context.Context, db *sql.DB) {
	t.Helper()
	tables := unwedgeTables(t, ctx, db)
	if len(tables) == 0 {
		t.Fatal("no unwedge tables to drop: unwedge never ran")
	}
	for _, table := range tables {
		if _, err := db.ExecContext(ctx, "DROP TABLE IF EXISTS "+table+" CASCADE"); err != nil {
			t.Fatal(err)
		}
	}
}

func readYAML(t *testing.T, path string) *yaml.Node {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc yaml.Node
	if err = yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("failed to parse %s: %v", path, err)
	}
	return &doc
}

// yamlAt is the node at path in a YAML document, or nil.
func yamlAt(node *yaml.Node, path ...string) *yaml.Node {
	if node != nil && node.Kind == yaml.DocumentNode {
		node = node.Content[0]
	}
	for _, key := range path {
		if node == nil || node.Kind != yaml.MappingNode {
			return nil
		}
		var next *yaml.Node
		for i := 0; i+1 < len(node.Content); i += 2 {
			if node.Content[i].Value == key {
				next = node.Content[i+1]
			}
		}
		node = next
	}
	return node
}

// leafPaths lists the paths of a mapping's scalar values.
func leafPaths(node *yaml.Node, prefix []string) [][]string {
	if node == nil || node.Kind != yaml.MappingNode {
		return [][]string{prefix}
	}
	var paths [][]string
	for i := 0; i+1 < len(node.Content); i += 2 {
		paths = append(paths, leafPaths(node.Content[i+1], append(append([]string{}, prefix...), node.Content[i].Value))...)
	}
	return paths
}

// dropKeys removes keys from a YAML file, as an older config would lack them.
func dropKeys(t *testing.T, path string, keys ...[]string) {
	t.Helper()
	doc := readYAML(t, path)
	for _, key := range keys {
		parent := yamlAt(doc, key[:len(key)-1]...)
		if parent == nil || yamlAt(parent, key[len(key)-1]) == nil {
			t.Fatalf("%s has no %s", path, strings.Join(key, "."))
		}
		for i := 0; i+1 < len(parent.Content); i += 2 {
			if parent.Content[i].Value == key[len(key)-1] {
				parent.Content = append(parent.Content[:i], parent.Content[i+2:]...)
				break
			}
		}
	}
	data, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	if err = os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}
