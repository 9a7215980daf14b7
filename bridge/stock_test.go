package bridge

import (
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/bridgev2/bridgeconfig"
	"maunium.net/go/mautrix/bridgev2/matrix"
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/upstream"
)

// TestStockMirror fails the day go.mod moves to a mautrix-go release other than the one stock.go
// mirrors, and says whether the stock helper's source changed with it. The mirrored file is pinned,
// with the others unwedge relies on, in internal/upstream (TestPinned there checks them all).
func TestStockMirror(t *testing.T) {
	version, data := stockCryptoSource(t)
	pin := upstream.Lookup(stockCryptoPath)
	sum := sha256.Sum256(data)
	switch got := hex.EncodeToString(sum[:]); {
	case got != pin.SHA256:
		t.Errorf("go.mod requires mautrix-go %s, whose %s (sha256 %s) differs from the one in %s that bridge/stock.go mirrors: "+
			"diff the two, bring stock.go and the parity table in docs/admin-guide.md along, then update its entry in internal/upstream", version, stockCryptoPath, got, upstream.Version)
	case version != upstream.Version:
		t.Errorf("go.mod requires mautrix-go %s; bridge/stock.go mirrors %s, and crypto.go is the same in both: check the other files internal/upstream pins, then set upstream.Version to %s", version, upstream.Version, version)
	}
}

// stockCryptoPath is the stock encryption helper's file in mautrix-go.
const stockCryptoPath = "bridgev2/matrix/crypto.go"

// stockCryptoSource returns the version of mautrix-go that go.mod requires and the source of its
// stock encryption helper.
func stockCryptoSource(t *testing.T) (version string, source []byte) {
	version, dir, err := upstream.Locate()
	if err != nil {
		t.Fatal(err)
	}
	source, err = os.ReadFile(filepath.Join(dir, filepath.FromSlash(stockCryptoPath)))
	if err != nil {
		t.Fatal(err)
	}
	return version, source
}

// TestEncryptionOptionsReachMachine sets each `encryption:` option that belongs to the OlmMachine
// alone, and checks that the machine got it and nothing else changed.
func TestEncryptionOptionsReachMachine(t *testing.T) {
	type machineView struct {
		sendKeysMinTrust                                                id.TrustState
		plaintextMentions, deleteOnAck, dontStore, ratchet, deleteFully bool
		deletePrev, deleteOnDeviceDelete, disableRotation               bool
	}
	view := func(m *crypto.OlmMachine) machineView {
		return machineView{m.SendKeysMinTrust, m.PlaintextMentions, m.DeleteOutboundKeysOnAck, m.DontStoreOutboundKeys,
			m.RatchetKeysOnDecrypt, m.DeleteFullyUsedKeysOnDecrypt, m.DeletePreviousKeysOnReceive, m.DeleteKeysOnDeviceDelete,
			m.DisableDeviceChangeKeyRotation}
	}
	tests := []struct {
		option string
		set    func(*bridgeconfig.EncryptionConfig)
		want   func(*machineView)
	}{
		{"verification_levels.receive", func(c *bridgeconfig.EncryptionConfig) {
			c.VerificationLevels.Receive = id.TrustStateCrossSignedVerified
		},
			func(v *machineView) { v.sendKeysMinTrust = id.TrustStateCrossSignedVerified }},
		{"plaintext_mentions", func(c *bridgeconfig.EncryptionConfig) { c.PlaintextMentions = true }, func(v *machineView) { v.plaintextMentions = true }},
		{"delete_keys.delete_outbound_on_ack", func(c *bridgeconfig.EncryptionConfig) { c.DeleteKeys.DeleteOutboundOnAck = true }, func(v *machineView) { v.deleteOnAck = true }},
		{"delete_keys.dont_store_outbound", func(c *bridgeconfig.EncryptionConfig) { c.DeleteKeys.DontStoreOutbound = true }, func(v *machineView) { v.dontStore = true }},
		{"delete_keys.ratchet_on_decrypt", func(c *bridgeconfig.EncryptionConfig) { c.DeleteKeys.RatchetOnDecrypt = true }, func(v *machineView) { v.ratchet = true }},
		{"delete_keys.delete_fully_used_on_decrypt", func(c *bridgeconfig.EncryptionConfig) { c.DeleteKeys.DeleteFullyUsedOnDecrypt = true }, func(v *machineView) { v.deleteFully = true }},
		{"delete_keys.delete_prev_on_new_session", func(c *bridgeconfig.EncryptionConfig) { c.DeleteKeys.DeletePrevOnNewSession = true }, func(v *machineView) { v.deletePrev = true }},
		{"delete_keys.delete_on_device_delete", func(c *bridgeconfig.EncryptionConfig) { c.DeleteKeys.DeleteOnDeviceDelete = true }, func(v *machineView) { v.deleteOnDeviceDelete = true }},
		{"rotation.disable_device_change_key_rotation", func(c *bridgeconfig.EncryptionConfig) { c.Rotation.DisableDeviceChangeKeyRotation = true },
			func(v *machineView) { v.disableRotation = true }},
	}
	configured := func(set func(*bridgeconfig.EncryptionConfig)) *crypto.OlmMachine {
		cfg := &bridgeconfig.Config{}
		if set != nil {
			set(&cfg.Encryption)
		}
		h := &Helper{conn: &matrix.Connector{Config: cfg}, mach: crypto.NewOlmMachine(&mautrix.Client{}, nil, crypto.NewMemoryStore(nil), nil)}
		h.configureMachine()
		if h.mach.DisableSharedGroupSessionTracking {
			t.Error("shared group session tracking is off: re-sharing and allowKeyShare's exception need it")
		}
		return h.mach
	}
	base := view(configured(nil))
	for _, tt := range tests {
		t.Run(tt.option, func(t *testing.T) {
			want := base
			tt.want(&want)
			if want == base {
				t.Fatal("the row expects no change")
			}
			if got := view(configured(tt.set)); got != want {
				t.Errorf("machine %+v, want %+v", got, want)
			}
		})
	}
}

// encryptionOptions maps every option of mautrix-go's `encryption:` block to its Go field name,
// from the config type.
func encryptionOptions(typ reflect.Type, prefix string, into map[string]string) map[string]string {
	for i := range typ.NumField() {
		field := typ.Field(i)
		name, _, _ := strings.Cut(field.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		if field.Type.Kind() == reflect.Struct {
			encryptionOptions(field.Type, prefix+name+".", into)
		} else {
			into[prefix+name] = field.Name
		}
	}
	return into
}

// TestParityTable checks the admin guide's parity table against mautrix-go: a row for every
// option of the `encryption:` block, none for an option that does not exist, and in each row
// either tests that exist in this repository, or a refusal at startup, or the word that the stock
// helper does not read the option (checked in its source: then it works with unwedge on as without).
func TestParityTable(t *testing.T) {
	fields := encryptionOptions(reflect.TypeFor[bridgeconfig.EncryptionConfig](), "encryption.", map[string]string{})
	options := slices.Sorted(maps.Keys(fields))
	_, stockSource := stockCryptoSource(t)
	guide := readGuide(t)
	documented := tableNames(guide, "encryption.")
	if len(options) < 20 {
		t.Fatalf("only %d options found in bridgeconfig.EncryptionConfig", len(options))
	}
	if !slices.Equal(options, documented) {
		t.Errorf("mautrix-go's encryption options %v,\nparity table rows %v", options, documented)
	}
	tests := testNames(t)
	row := regexp.MustCompile("(?m)^\\| `(encryption\\.[a-z0-9_.]+)`.*\\|([^|]*)\\|\\s*$")
	testRef := regexp.MustCompile("`(Test[A-Za-z0-9_]+)(?:/[^`]*)?`")
	for _, m := range row.FindAllStringSubmatch(guide, -1) {
		option, shownBy := m[1], m[2]
		if strings.Contains(shownBy, "not read by the stock helper") {
			// A field access, not a method of the same name (time.Duration's Milliseconds).
			if read := regexp.MustCompile(`\.` + fields[option] + `\b(?:[^(]|$)`); read.Match(stockSource) {
				t.Errorf("parity row says the stock helper does not read %s, but its crypto.go uses .%s", option, fields[option])
			}
			continue
		}
		refs := testRef.FindAllStringSubmatch(shownBy, -1)
		if len(refs) == 0 && !strings.Contains(m[0], "refused at startup") {
			t.Errorf("parity row names no test and no startup refusal: %s", m[0])
		}
		for _, ref := range refs {
			if !tests[ref[1]] {
				t.Errorf("parity row names %s, which is no test in this repository: %s", ref[1], m[0])
			}
		}
	}
}

// testNames returns the names of the Test functions in the repository's _test.go files.
func testNames(t *testing.T) map[string]bool {
	names := map[string]bool{}
	decl := regexp.MustCompile(`(?m)^func (Test[A-Za-z0-9_]+)\(t \*testing\.T\)`)
	err := filepath.WalkDir("..", func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, "_test.go") {
			return err
		}
		data, err := os.ReadFile(path)
		for _, m := range decl.FindAllStringSubmatch(string(data), -1) {
			names[m[1]] = true
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// TestInstallKeepsStock: with unwedge disabled, or encryption not allowed (bridgev2 made no
// helper), Install leaves the Matrix connector's encryption helper as it is.
func TestInstallKeepsStock(t *testing.T) {
	stock := matrix.NewCryptoHelper(&matrix.Connector{Config: &bridgeconfig.Config{Encryption: bridgeconfig.EncryptionConfig{Allow: true}}, Log: new(zerolog.Nop())})
	for _, tc := range []struct {
		name    string
		enabled bool
		crypto  matrix.Crypto
	}{
		{"unwedge disabled", false, stock},
		{"encryption not allowed", true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &mxmain.BridgeMain{Matrix: &matrix.Connector{Crypto: tc.crypto}}
			cfg := unwedge.DefaultConfig()
			cfg.Enabled = tc.enabled
			if h := Install(m, &cfg); h != nil || m.Matrix.Crypto != tc.crypto {
				t.Errorf("Install returned %v and left helper %T, want nil and %T", h, m.Matrix.Crypto, tc.crypto)
			}
		})
	}
}
