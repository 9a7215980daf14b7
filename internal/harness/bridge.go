package harness

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/webhook"
)

// metricsPortOffset places a bridge's metrics listener next to its slot's appservice port.
const metricsPortOffset = 100

// BridgeOptions configures one reference bridge process.
type BridgeOptions struct {
	Binary        string // path of the built unwedge-bridge
	Dir           string // working directory: config.yaml, bridge.log, SQLite files
	HomeserverURL string
	Domain        string
	Slot          *Slot
	// DatabaseType is "postgres" (DatabaseURI is a postgres:// URI) or "sqlite3-fk-wal" (a file in Dir).
	DatabaseType string
	DatabaseURI  string
	// AppserviceEncryption receives to-device events through appservice transactions
	// (MSC2409/MSC3202, device via MSC4190) instead of the bot device's /sync.
	AppserviceEncryption bool
	// Admins get admin permission on the bridge; everyone on Domain gets user permission.
	Admins []id.UserID
	// Stock runs the bridge without unwedge (network.unwedge.enabled: false): mautrix-go's own
	// encryption helper, untouched.
	Stock bool
	// Config sets more options, by dotted path (for example "network.unwedge.recovery.retention").
	Config map[string]any
	// Metrics serves unwedge's metrics on a free local port (Bridge.MetricsURL).
	Metrics bool
	// Env adds environment variables (KEY=VALUE) to the bridge process; Start uses the current
	// value, so a test can change it between restarts.
	Env []string
	// ExampleConfig is the example config that config.yaml is made from: the path of one that
	// another bridge binary wrote with -e. Empty means this repository's example-config.yaml.
	ExampleConfig string
	// SaveConfig lets the bridge write its upgraded config back to config.yaml at start (it runs
	// without --no-update), as a bridge run by an admin does.
	SaveConfig bool
}

// Exited is closed when the bridge process has exited (after Start).
func (b *Bridge) Exited() <-chan struct{} { return b.exited }

// Bridge is a running reference bridge process.
type Bridge struct {
	Opts       BridgeOptions
	URL        string // the appservice listener: webhook API and provisioning API
	BotMXID    id.UserID
	ConfigPath string
	LogPath    string
	// MetricsURL is unwedge's metrics endpoint, with Opts.Metrics.
	MetricsURL   string
	sharedSecret string
	pickleKey    string

	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

// StartBridge writes the config of a new bridge (one with an empty database), deletes the bot
// devices that earlier bridges left on the slot, and starts it, returning once it is ready.
func StartBridge(ctx context.Context, opts BridgeOptions) (*Bridge, error) {
	b, err := NewBridge(opts)
	if err != nil {
		return nil, err
	}
	if _, err = b.ClearBotDevices(ctx); err != nil {
		return nil, err
	}
	return b, b.Start(ctx)
}

// ClearBotDevices deletes every device of the bridge's bot user and returns how many there were.
// Each bridge that starts from an empty database creates a new bot device, and nothing deletes
// the old ones: on a homeserver that runs the tests over and over they pile up in the hundreds,
// every encrypted message is shared with all of them, and every appservice transaction carries
// a one-time key count for each. Appservices delete devices without user-interactive auth
// (MSC4190). Call it only while no process runs with the slot's bot device.
func (b *Bridge) ClearBotDevices(ctx context.Context) (int, error) {
	if b.Opts.Slot.ASToken == "" {
		return 0, nil
	}
	client, err := mautrix.NewClient(b.Opts.HomeserverURL, b.BotMXID, b.Opts.Slot.ASToken)
	if err != nil {
		return 0, err
	}
	client.SetAppServiceUserID = true
	resp, err := client.GetDevicesInfo(ctx)
	if errors.Is(err, mautrix.MForbidden) {
		return 0, nil // the bot was never registered: no bridge ran on this slot yet
	} else if err != nil {
		return 0, fmt.Errorf("failed to list the devices of %s: %w", b.BotMXID, err)
	}
	ids := make([]id.DeviceID, len(resp.Devices))
	for i, dev := range resp.Devices {
		ids[i] = dev.DeviceID
	}
	// Synapse takes about a tenth of a second per device, so a pile is deleted in batches, each
	// of which stays deleted if ctx ends before the next.
	for batch := range slices.Chunk(ids, 50) {
		if err = client.DeleteDevices(ctx, &mautrix.ReqDeleteDevices[any]{Devices: batch}); err != nil {
			return 0, fmt.Errorf("failed to delete the %d devices of %s: %w", len(ids), b.BotMXID, err)
		}
	}
	return len(ids), nil
}

// NewBridge writes the bridge's config.yaml in opts.Dir without starting it. When the slot has no
// tokens, the config keeps the example's placeholders for GenerateRegistration to fill.
func NewBridge(opts BridgeOptions) (*Bridge, error) {
	b := &Bridge{
		Opts:         opts,
		URL:          fmt.Sprintf("http://127.0.0.1:%d", opts.Slot.Port),
		BotMXID:      id.NewUserID(opts.Slot.BotLocalpart, opts.Domain),
		ConfigPath:   filepath.Join(opts.Dir, "config.yaml"),
		LogPath:      filepath.Join(opts.Dir, "bridge.log"),
		sharedSecret: randomHex(24),
		pickleKey:    randomHex(16),
	}
	if opts.Metrics {
		// Slots are held exclusively, so the port next to the slot's is free too.
		b.MetricsURL = fmt.Sprintf("http://127.0.0.1:%d/metrics", opts.Slot.Port+metricsPortOffset)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, err
	}
	if err := b.writeConfig(); err != nil {
		return nil, err
	}
	return b, nil
}

// GenerateRegistration runs `unwedge-bridge -g`, as an admin would: it writes the appservice
// registration to path and the generated tokens into the config.
func (b *Bridge) GenerateRegistration(ctx context.Context, path string) error {
	cmd := exec.CommandContext(ctx, b.Opts.Binary, "-g", "-c", b.ConfigPath, "-r", path)
	cmd.Dir = b.Opts.Dir
	if output, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("failed to generate registration: %w\n%s", err, output)
	}
	return nil
}

// Start (re)starts the process with the config written by StartBridge.
func (b *Bridge) Start(ctx context.Context) error {
	logFile, err := os.OpenFile(b.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	args := []string{"-c", b.ConfigPath}
	if !b.Opts.SaveConfig {
		args = append(args, "--no-update")
	}
	cmd := exec.Command(b.Opts.Binary, args...)
	cmd.Dir = b.Opts.Dir
	cmd.Env = append(os.Environ(), b.Opts.Env...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err = cmd.Start(); err != nil {
		_ = logFile.Close()
		return fmt.Errorf("failed to start bridge: %w", err)
	}
	b.cmd, b.exited, b.err = cmd, make(chan struct{}), nil
	go func() {
		b.err = cmd.Wait()
		_ = logFile.Close()
		close(b.exited)
	}()
	if err = b.waitReady(ctx); err != nil {
		_ = b.Kill()
		return fmt.Errorf("%w\n--- bridge log tail ---\n%s", err, b.LogTail(40))
	}
	return nil
}

func (b *Bridge) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, b.URL+"/_matrix/mau/ready", nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-b.exited:
			return fmt.Errorf("bridge exited before it was ready: %v", b.err)
		case <-ctx.Done():
			return fmt.Errorf("bridge not ready: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Stop stops the bridge with SIGTERM and waits for it to exit.
func (b *Bridge) Stop() error {
	return b.signal(syscall.SIGTERM, 30*time.Second)
}

// Kill stops the bridge with SIGKILL, as a crash would.
func (b *Bridge) Kill() error {
	return b.signal(syscall.SIGKILL, 10*time.Second)
}

func (b *Bridge) signal(sig syscall.Signal, wait time.Duration) error {
	if b.cmd == nil {
		return nil
	}
	select {
	case <-b.exited:
		return nil
	default:
	}
	_ = b.cmd.Process.Signal(sig)
	select {
	case <-b.exited:
		return nil
	case <-time.After(wait):
		_ = b.cmd.Process.Kill()
		<-b.exited
		return fmt.Errorf("bridge did not stop within %s after %s", wait, sig)
	}
}

// SetConfig changes options of the bridge's config.yaml (by dotted path, as BridgeOptions.Config
// does) for its next Start; the generated secrets, such as the pickle key, stay the same.
func (b *Bridge) SetConfig(config map[string]any) error {
	merged := maps.Clone(b.Opts.Config)
	if merged == nil {
		merged = make(map[string]any, len(config))
	}
	maps.Copy(merged, config)
	b.Opts.Config = merged
	return b.writeConfig()
}

// PickleKey is the key the bridge's crypto store pickles Olm state with (encryption.pickle_key).
func (b *Bridge) PickleKey() string { return b.pickleKey }

// LogTail returns the last n lines of the bridge's log.
func (b *Bridge) LogTail(n int) string {
	data, _ := os.ReadFile(b.LogPath)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// Login logs userID in to the webhook network through the provisioning API and returns an API
// client with the login's token. webhookURL may be empty (outbox only).
func (b *Bridge) Login(ctx context.Context, userID id.UserID, account, webhookURL string) (*webhook.RemoteClient, error) {
	done, err := b.LoginFlow(ctx, userID, "webhook", map[string]string{"account": account, "webhook_url": webhookURL})
	if err != nil {
		return nil, err
	}
	token, ok := webhook.TokenFromInstructions(done.Instructions)
	if !ok {
		return nil, fmt.Errorf("login completed without a webhook API token: %q", done.Instructions)
	}
	return webhook.NewRemoteClient(b.URL, token), nil
}

// LoginFlow logs userID in through the provisioning API with a login flow of one user-input
// step, for any network, and returns the completed step.
func (b *Bridge) LoginFlow(ctx context.Context, userID id.UserID, flowID string, input map[string]string) (*bridgev2.LoginStep, error) {
	var start struct {
		LoginID string `json:"login_id"`
		bridgev2.LoginStep
	}
	query := "?user_id=" + url.QueryEscape(userID.String())
	if err := b.provision(ctx, "/v3/login/start/"+url.PathEscape(flowID)+query, nil, &start); err != nil {
		return nil, fmt.Errorf("failed to start login: %w", err)
	}
	var done bridgev2.LoginStep
	path := fmt.Sprintf("/v3/login/step/%s/%s/user_input%s", url.PathEscape(start.LoginID), url.PathEscape(start.StepID), query)
	if err := b.provision(ctx, path, input, &done); err != nil {
		return nil, fmt.Errorf("failed to submit login: %w", err)
	}
	if done.Type != bridgev2.LoginStepTypeComplete {
		return nil, fmt.Errorf("login did not complete: %s %q", done.Type, done.Instructions)
	}
	return &done, nil
}

func (b *Bridge) provision(ctx context.Context, path string, body, into any) error {
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	if body == nil {
		data = []byte("{}")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.URL+"/_matrix/provision"+path, bytes.NewReader(data))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+b.sharedSecret)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	respData, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("provisioning API answered %s: %s", resp.Status, respData)
	}
	return json.Unmarshal(respData, into)
}

func (b *Bridge) writeConfig() error {
	root, err := loadExampleConfig(b.Opts.ExampleConfig)
	if err != nil {
		return err
	}
	o, slot := &b.Opts, b.Opts.Slot
	dbURI := o.DatabaseURI
	if o.DatabaseType == "sqlite3-fk-wal" && dbURI == "" {
		dbURI = "file:" + filepath.Join(o.Dir, "bridge.db") + "?_txlock=immediate"
	}
	perms := map[string]string{"*": "relay", o.Domain: "user"}
	for _, admin := range o.Admins {
		perms[admin.String()] = "admin"
	}
	type setting struct {
		value any
		path  string
	}
	set := []setting{
		{o.HomeserverURL, "homeserver.address"},
		{o.Domain, "homeserver.domain"},
		{slot.ID, "appservice.id"},
		{b.URL, "appservice.address"},
		{b.URL, "appservice.public_address"},
		{"127.0.0.1", "appservice.hostname"},
		{slot.Port, "appservice.port"},
		{slot.BotLocalpart, "appservice.bot.username"},
		{slot.UsernameTemplate, "appservice.username_template"},
		{o.DatabaseType, "database.type"},
		{dbURI, "database.uri"},
		{perms, "bridge.permissions"},
		{b.sharedSecret, "provisioning.shared_secret"},
		{b.pickleKey, "encryption.pickle_key"},
		{o.AppserviceEncryption, "encryption.appservice"},
		{true, "encryption.msc4190"},
		{!o.Stock, "network.unwedge.enabled"},
		{o.Metrics, "network.unwedge.metrics.enabled"},
		{fmt.Sprintf("127.0.0.1:%d", slot.Port+metricsPortOffset), "network.unwedge.metrics.listen"},
		{map[string]any{
			"min_level": "debug",
			"writers":   []map[string]any{{"type": "stdout", "format": "json"}},
		}, "logging"},
	}
	if o.ExampleConfig == "" {
		// The tests' webhook receivers listen on 127.0.0.1, which the webhook network refuses
		// by default (SSRF protection).
		set = append(set, setting{true, "network.delivery.allow_private_addresses"})
	}
	for path, value := range o.Config {
		set = append(set, setting{value, path})
	}
	if slot.ASToken != "" {
		set = append(set,
			setting{slot.ASToken, "appservice.as_token"},
			setting{slot.HSToken, "appservice.hs_token"})
	}
	for _, s := range set {
		if err = setYAML(root, s.value, strings.Split(s.path, ".")...); err != nil {
			return fmt.Errorf("failed to set %s: %w", s.path, err)
		}
	}
	data, err := yaml.Marshal(root)
	if err != nil {
		return err
	}
	return os.WriteFile(b.ConfigPath, data, 0o600)
}

// loadExampleConfig parses the example config at path, or this repository's when path is empty.
func loadExampleConfig(path string) (*yaml.Node, error) {
	if path == "" {
		root, err := ModuleRoot()
		if err != nil {
			return nil, err
		}
		path = filepath.Join(root, "example-config.yaml")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var doc yaml.Node
	if err = yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("failed to parse %s: %w", path, err)
	}
	return &doc, nil
}

// setYAML replaces (or adds) the value at path in a YAML document, keeping the rest as it is.
func setYAML(doc *yaml.Node, value any, path ...string) error {
	node := doc
	if node.Kind == yaml.DocumentNode {
		node = node.Content[0]
	}
	var encoded yaml.Node
	if err := encoded.Encode(value); err != nil {
		return err
	}
	for i, key := range path {
		if node.Kind != yaml.MappingNode {
			return fmt.Errorf("%s is not a mapping", strings.Join(path[:i], "."))
		}
		var child *yaml.Node
		for j := 0; j+1 < len(node.Content); j += 2 {
			if node.Content[j].Value == key {
				child = node.Content[j+1]
				break
			}
		}
		if child == nil {
			child = &yaml.Node{Kind: yaml.MappingNode}
			node.Content = append(node.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: key}, child)
		}
		if i == len(path)-1 {
			*child = encoded
		}
		node = child
	}
	return nil
}

// modulePath is the first line of this repository's go.mod.
const modulePath = "module github.com/unwedge/unwedge"

// ModuleRoot finds the directory of this repository's go.mod, from the working directory up
// (a go.mod of another module on the way is skipped).
func ModuleRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("failed to get the working directory: %w", err)
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if data, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil {
			first, _, _ := strings.Cut(string(data), "\n")
			if strings.TrimSpace(first) == modulePath {
				return dir, nil
			}
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("no go.mod starting with %q in %s or above", modulePath, wd)
		}
	}
}

// BuildBridge builds the reference bridge binary into dir with -tags goolm and any extra build
// tags (fault.Tag for a bridge with fault points).
func BuildBridge(ctx context.Context, dir string, tags ...string) (string, error) {
	return BuildBinary(ctx, dir, "./cmd/bridge", "unwedge-bridge", tags...)
}

// BuildBinary builds the main package pkg of this repository (such as "./cmd/echobridge") into
// dir/name with -tags goolm and any extra build tags.
func BuildBinary(ctx context.Context, dir, pkg, name string, tags ...string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, name)
	tagList := strings.Join(append([]string{"goolm"}, tags...), ",")
	cmd := exec.CommandContext(ctx, "go", "build", "-tags", tagList, "-o", out, pkg)
	cmd.Dir = root
	if output, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("failed to build %s: %w\n%s", pkg, err, output)
	}
	return out, nil
}

func randomHex(n int) string {
	buf := make([]byte, n)
	_, _ = rand.Read(buf)
	return hex.EncodeToString(buf)
}
