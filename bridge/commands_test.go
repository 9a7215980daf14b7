package bridge

import (
	"context"
	"fmt"
	"html"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/bridgeconfig"
	"maunium.net/go/mautrix/bridgev2/commands"
	bridgedb "maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/format"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// TestStatusFromLedger: `unwedge status` reads the heal history from the database, so a restarted
// bridge (or another replica) shows what happened before; what this process decided besides heals
// (here: a wedge limited by the interval) is shown on top while it is newer.
func TestStatusFromLedger(t *testing.T) {
	ctx := context.Background()
	udb := cryptotest.UnwedgeDB(t, cryptotest.Database(t))

	const alice = id.UserID("@alice:example.org")
	phone := &id.Device{UserID: alice, DeviceID: "PHONE", IdentityKey: "phoneKey"}
	laptop := &id.Device{UserID: alice, DeviceID: "LAPTOP", IdentityKey: "laptopKey"}
	old := unwedge.LedgerDevice{UserID: alice, DeviceID: "OLD", IdentityKey: "oldKey"}
	dev := func(d *id.Device) unwedge.LedgerDevice {
		return unwedge.LedgerDevice{UserID: d.UserID, DeviceID: d.DeviceID, IdentityKey: d.IdentityKey}
	}
	// A previous bridge process healed PHONE twice, failed LAPTOP for good, and healed a device
	// that is gone since.
	heal := func(d unwedge.LedgerDevice, at time.Time, class unwedge.Class, session id.SessionID, outcome unwedge.HealOutcome, healErr string) {
		t.Helper()
		grant, err := udb.Ledger.AcquireDevice(ctx, d, unwedge.AcquireParams{Now: at, MinInterval: time.Hour, Force: true, Owner: "old-process", Lease: time.Minute, Class: class})
		if err != nil || !grant.Granted {
			t.Fatalf("acquire: %+v, %v", grant, err)
		}
		if session != "" {
			if err = udb.Ledger.SessionCreated(ctx, unwedge.HealRef{Device: d, Owner: "old-process", HealID: grant.HealID}, session, at); err != nil {
				t.Fatal(err)
			}
		}
		if err = udb.Ledger.FinishHeal(ctx, unwedge.HealRef{Device: d, Owner: "old-process", HealID: grant.HealID}, unwedge.HealEnd{Outcome: outcome, Attempts: 1, Err: healErr, At: at.Add(time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	heal(dev(phone), now.Add(-3*time.Hour), "bad_mac", "firstSession", unwedge.HealHealed, "")
	heal(dev(phone), now.Add(-10*time.Minute), "prekey_unknown_otk", "secondSession", unwedge.HealHealed, "")
	heal(dev(laptop), now.Add(-5*time.Minute), "no_session", "", unwedge.HealFailedPermanent, "no one-time keys")
	heal(old, now.Add(-20*time.Hour), "no_session", "oldSession", unwedge.HealHealed, "")

	// The restarted bridge: its memory is empty, its store knows PHONE and LAPTOP.
	client, err := mautrix.NewClient("https://matrix.example.org", "@bridgebot:example.org", "token")
	if err != nil {
		t.Fatal(err)
	}
	client.DeviceID = "BRIDGE"
	store := unwedge.NewStore(crypto.NewMemoryStore(nil), udb.Shared, nil)
	if err := store.PutDevices(ctx, alice, map[id.DeviceID]*id.Device{phone.DeviceID: phone, laptop.DeviceID: laptop}); err != nil {
		t.Fatal(err)
	}
	log := zerolog.Nop()
	mach := crypto.NewOlmMachine(client, &log, store, mautrix.NewMemoryStateStore().(crypto.StateStore))
	if err = mach.Load(ctx); err != nil {
		t.Fatal(err)
	}
	h := &Helper{db: udb, mach: mach}

	status := rendered(h.statusReport(ctx, alice)).Body
	for _, want := range []string{
		"* device `PHONE` (identity key `phoneKey`)\n  * last decision: healed (prekey_unknown_otk) ",
		"new Olm session secondSession after 1 attempt(s)\n",
		"  * last replacement session: healed (prekey_unknown_otk) 10m0s ago, session `secondSession`, 1 attempt(s)\n",
		"  * earlier heal: healed (bad_mac) 3h0m0s ago, session `firstSession`",
		"* device `LAPTOP` (identity key `laptopKey`)\n  * last decision: failed (no_session) ",
		"failed_permanent after 1 attempt(s): no one-time keys",
		"* device `OLD` (identity key `oldKey`), no longer among the user's devices\n",
		"Messages waiting for their keys: 0",
	} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	if strings.Contains(status, "remembered by this bridge process") {
		t.Errorf("a restarted bridge claims to remember decisions:\n%s", status)
	}

	// This process decides something that is no heal: PHONE's session wedges again within the
	// hour. It is shown as the last decision; the heal history stays below it.
	h.unwedger, err = unwedge.New(unwedge.DefaultConfig(), mach, unwedge.Parts{Store: store, Ledger: udb.Ledger, Audience: cryptotest.Everyone{}}, "this-process", log)
	if err != nil {
		t.Fatal(err)
	}
	if d := h.unwedger.Heal(ctx, phone, unwedge.ClassNoMatchingSession, ""); d.Action != unwedge.ActionLimited {
		t.Fatalf("heal within the interval: %s, want limited", d.Action)
	}
	status = rendered(h.statusReport(ctx, alice)).Body
	for _, want := range []string{
		"* device `PHONE` (identity key `phoneKey`)\n  * last decision: limited (no_matching_session) ",
		"(remembered by this bridge process)\n  * last replacement session: healed (prekey_unknown_otk)",
		"* device `LAPTOP` (identity key `laptopKey`)\n  * last decision: failed (no_session) ",
	} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	t.Log(status)
}

// rendered is what a client shows of a command's markdown answer (ce.Reply renders it so).
func rendered(markdown string) event.MessageEventContent {
	return format.RenderMarkdown(markdown, true, false)
}

// fakeBot keeps the bot's answers to commands.
type fakeBot struct {
	bridgev2.MatrixAPI
	lock    sync.Mutex
	answers []event.MessageEventContent
	rooms   []id.RoomID
}

func (b *fakeBot) SendMessage(_ context.Context, roomID id.RoomID, _ event.Type, content *event.Content, _ *bridgev2.MatrixSendExtra) (*mautrix.RespSendEvent, error) {
	b.lock.Lock()
	defer b.lock.Unlock()
	b.answers = append(b.answers, *content.Parsed.(*event.MessageEventContent))
	b.rooms = append(b.rooms, roomID)
	return &mautrix.RespSendEvent{EventID: id.EventID(fmt.Sprintf("$answer%d", len(b.answers)))}, nil
}

type userScope map[id.UserID]bool

func (s userScope) InScope(_ context.Context, userID id.UserID) (bool, error) { return s[userID], nil }

const (
	cmdAdmin      = id.UserID("@admin:example.org")
	cmdManagement = id.RoomID("!management:example.org")
	cmdPortal     = id.RoomID("!portal:example.org")
	cmdAlice      = id.UserID("@alice:example.org") // in scope
	cmdBob        = id.UserID("@bob:example.org")   // out of scope
)

// commandFixture runs the `unwedge` command as bridgev2 would: a real OlmMachine, Unwedger and
// ledger, and the crypto test kit's homeserver with two peers that uploaded one-time keys, which
// counts the bridge's key claims and records its key requests.
type commandFixture struct {
	t      *testing.T
	ctx    context.Context
	hs     *cryptotest.Homeserver
	udb    *database.UnwedgeDB
	mach   *crypto.OlmMachine
	store  *unwedge.Store // the machine's
	h      *Helper
	bot    *fakeBot
	phone  *id.Device // alice's
	tablet *id.Device // bob's
}

func newCommandFixture(t *testing.T) *commandFixture {
	f := &commandFixture{t: t, ctx: t.Context(), hs: cryptotest.NewHomeserver(t), bot: &fakeBot{}}
	f.hs.Log = zerolog.Nop()
	f.udb = cryptotest.UnwedgeDB(t, cryptotest.Database(t))
	f.hs.NewDevice(cmdAlice, "PHONE", cryptotest.Store{})
	f.hs.NewDevice(cmdBob, "TABLET", cryptotest.Store{})
	bridge := f.hs.NewDevice("@bridgebot:example.org", "BRIDGE", cryptotest.Store{Shared: f.udb.Shared})
	f.mach, f.store = bridge.Mach, bridge.Wrapped
	f.phone, f.tablet = bridge.Fetch(cmdAlice, "PHONE"), bridge.Fetch(cmdBob, "TABLET")
	f.restart()
	return f
}

// sentKeyRequests returns the key requests sent so far.
func (f *commandFixture) sentKeyRequests() []cryptotest.KeyRequest { return f.hs.KeyRequests() }

// restart makes a new Helper and Unwedger on the same database and machine, as a restarted
// bridge (or another replica) has: nothing in memory.
func (f *commandFixture) restart() {
	cfg := unwedge.DefaultConfig()
	cfg.MinBackoff, cfg.MaxBackoff, cfg.MaxRetries = time.Millisecond, time.Millisecond, 1
	replacing := unwedge.NewReplacing()
	recovery := unwedge.NewRecovery(cfg.Recovery, f.mach, f.udb.Pending, nil, replacing.Healing, fmt.Sprintf("process-%p", f), zerolog.Nop())
	u, err := unwedge.New(cfg, f.mach, unwedge.Parts{Store: f.store, Ledger: f.udb.Ledger, Audience: userScope{cmdAlice: true}, Replacing: replacing}, fmt.Sprintf("process-%p", f), zerolog.Nop())
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(u.Stop)
	f.h = &Helper{db: f.udb, mach: f.mach, unwedger: u, recovery: recovery}
}

// run sends `unwedge <args>` from room (the admin's management room, or a portal) and returns
// what the admin's client shows of the answer.
func (f *commandFixture) run(room id.RoomID, args ...string) string {
	f.t.Helper()
	log := zerolog.Nop()
	ce := &commands.Event{
		Bot: f.bot, Bridge: &bridgev2.Bridge{Config: &bridgeconfig.BridgeConfig{CommandPrefix: "!wh"}},
		RoomID: room, OrigRoomID: room, EventID: "$command", Command: "unwedge", Args: args, RawArgs: strings.Join(args, " "),
		User: &bridgev2.User{User: &bridgedb.User{MXID: cmdAdmin, ManagementRoom: cmdManagement},
			Permissions: bridgeconfig.Permissions{Commands: true, Admin: true}},
		Ctx: f.ctx, Log: &log,
	}
	if room == cmdPortal {
		ce.Portal = &bridgev2.Portal{}
	}
	before := len(f.bot.answers)
	f.h.handleCommand(ce)
	if len(f.bot.answers) != before+1 {
		f.t.Fatalf("unwedge %s: %d answers", strings.Join(args, " "), len(f.bot.answers)-before)
	}
	if f.bot.rooms[before] != room {
		f.t.Fatalf("unwedge %s: answered in %s", strings.Join(args, " "), f.bot.rooms[before])
	}
	answer := f.bot.answers[before]
	f.t.Logf("unwedge %s: %s", strings.Join(args, " "), answer.Body)
	return answer.Body + "\n" + answer.FormattedBody
}

// healedBefore records a heal of the device that created a session ago.
func (f *commandFixture) healedBefore(d *id.Device, ago time.Duration) {
	f.t.Helper()
	dev := unwedge.LedgerDevice{UserID: d.UserID, DeviceID: d.DeviceID, IdentityKey: d.IdentityKey}
	at := time.Now().Add(-ago)
	grant, err := f.udb.Ledger.AcquireDevice(f.ctx, dev, unwedge.AcquireParams{Now: at, MinInterval: time.Hour, Owner: "earlier", Lease: time.Minute, Class: "bad_mac"})
	if err != nil || !grant.Granted {
		f.t.Fatalf("acquire: %+v, %v", grant, err)
	}
	if err = f.udb.Ledger.SessionCreated(f.ctx, unwedge.HealRef{Device: dev, Owner: "earlier", HealID: grant.HealID}, "earlierSession", at); err != nil {
		f.t.Fatal(err)
	}
	if err = f.udb.Ledger.FinishHeal(f.ctx, unwedge.HealRef{Device: dev, Owner: "earlier", HealID: grant.HealID}, unwedge.HealEnd{Outcome: unwedge.HealHealed, Attempts: 1, At: at.Add(time.Second)}); err != nil {
		f.t.Fatal(err)
	}
}

// TestHealCommandLimits: `unwedge heal` without --force is the heal a wedge would get (limited
// within min_interval, refused for a user out of scope); --force skips both, but a device gets
// at most one forced heal per forcedHealWindow, also after a restart. Key claims are counted:
// repeating the command cannot drain a device's one-time keys.
func TestHealCommandLimits(t *testing.T) {
	f := newCommandFixture(t)
	f.healedBefore(f.phone, 10*time.Minute)

	answer := f.run(cmdManagement, "heal", string(cmdAlice), "PHONE")
	if !strings.Contains(answer, "Not healed") || !strings.Contains(answer, "limited") || !strings.Contains(answer, "created 10m0s ago (at most one per 1h0m0s)") {
		t.Errorf("heal within min_interval: %s", answer)
	}
	answer = f.run(cmdManagement, "heal", string(cmdBob), "TABLET")
	if !strings.Contains(answer, "Not healed") || !strings.Contains(answer, "outside unwedge's scope") {
		t.Errorf("heal of a user out of scope: %s", answer)
	}
	if n := f.hs.Claims(); n != 0 {
		t.Fatalf("%d key claims for heals that were refused", n)
	}

	// Forced: the interval and the scope are skipped, once.
	for _, dev := range []*id.Device{f.phone, f.tablet} {
		answer = f.run(cmdManagement, "heal", "--force", string(dev.UserID), string(dev.DeviceID))
		if !strings.Contains(answer, "Created a new Olm session") {
			t.Errorf("forced heal of %s: %s", dev.DeviceID, answer)
		}
	}
	if n := f.hs.Claims(); n != 2 {
		t.Fatalf("%d key claims for two forced heals", n)
	}
	answer = f.run(cmdManagement, "heal", string(cmdBob), "TABLET", "--force")
	if !strings.Contains(answer, "Not healed") || !strings.Contains(answer, "at most one forced heal per 5m0s") {
		t.Errorf("second forced heal within the window: %s", answer)
	}
	// A restarted bridge (or another replica) reads the forced heal from the ledger.
	f.restart()
	answer = f.run(cmdManagement, "heal", "--force", string(cmdAlice), "PHONE")
	if !strings.Contains(answer, "Not healed") || !strings.Contains(answer, "had a forced heal 0s ago") {
		t.Errorf("forced heal within the window after a restart: %s", answer)
	}
	if n := f.hs.Claims(); n != 2 {
		t.Errorf("%d key claims after forced heals were repeated, want 2", n)
	}
	answer = f.run(cmdManagement, "status", string(cmdAlice))
	if !strings.Contains(answer, "healed (forced)") || !strings.Contains(answer, "forced by "+string(cmdAdmin)) {
		t.Errorf("status after the forced heal: %s", answer)
	}
}

// TestCommandOutsideManagementRoom: in a portal (or any room but the sender's management room)
// every subcommand answers only where to use it: no device, key or session, and no heal.
func TestCommandOutsideManagementRoom(t *testing.T) {
	f := newCommandFixture(t)
	f.healedBefore(f.phone, 2*time.Hour)
	for _, room := range []id.RoomID{cmdPortal, "!other:example.org"} {
		for _, args := range [][]string{{"status"}, {"status", string(cmdAlice)}, {"pending", "all"},
			{"heal", string(cmdAlice), "PHONE"}, {"heal", "--force", string(cmdAlice), "PHONE"}, {}} {
			answer := f.run(room, args...)
			if !strings.Contains(answer, "management room") {
				t.Errorf("unwedge %v in %s: %s", args, room, answer)
			}
			for _, secret := range []string{"PHONE", string(f.phone.IdentityKey), "earlierSession", "Olm session"} {
				if strings.Contains(answer, secret) {
					t.Errorf("unwedge %v in %s names %q: %s", args, room, secret, answer)
				}
			}
		}
	}
	if n := f.hs.Claims(); n != 0 {
		t.Errorf("%d key claims from commands outside the management room", n)
	}
	// The same command in the management room names the device.
	if answer := f.run(cmdManagement, "status", string(cmdAlice)); !strings.Contains(answer, "PHONE") {
		t.Errorf("status in the management room: %s", answer)
	}
}

var hostile = []string{
	"*bold* _em_ **strong**",
	"[link](https://evil.example)",
	"![image](mxc://evil/x)",
	"<https://evil.example>",
	"`code` ``two`` ` lone",
	"<script>alert(1)</script><b>b</b>",
	"line\n# heading\n* item\n\n> quote",
	"a\r\n\r\n---\r\nb\u2028c\u2029d\te",
	"||spoiler|| ~~strike~~ | table | x |",
	"&lt;b&gt; &amp; \\*escaped\\*",
	"$cmdprefix %s %v @room",
	"",
}

// htmlTags are the tags in rendered HTML (text's < is escaped as &lt;).
var htmlTags = regexp.MustCompile(`</?[a-zA-Z][^>]*>`)

// TestEscape: a value a peer controls comes out as the text it is: escape as one inline code
// span, escapeText as plain text, with line breaks as spaces; no emphasis, link, image, heading,
// list, quote, HTML, spoiler or strikethrough.
func TestEscape(t *testing.T) {
	for _, s := range hostile {
		want := strings.Join(strings.Fields(oneLine(s)), " ")
		for _, c := range []struct {
			name string
			md   string
			tags []string
		}{
			{"escape", escape(s), []string{"<code>", "</code>"}},
			{"escapeText", escapeText(s), nil},
		} {
			content := rendered("before " + c.md + " after")
			htmlBody := content.FormattedBody
			if htmlBody == "" {
				htmlBody = content.Body // the HTML was plain text
			}
			if got := htmlTags.FindAllString(htmlBody, -1); !slices.Equal(got, c.tags) {
				t.Errorf("%s(%q) renders tags %q: %q", c.name, s, got, htmlBody)
			}
			text := html.UnescapeString(htmlTags.ReplaceAllString(htmlBody, ""))
			if got := strings.Join(strings.Fields(text), " "); got != strings.TrimSpace("before "+want+" after") && got != "before after" {
				t.Errorf("%s(%q) shows %q, want the text", c.name, s, got)
			} else if want != "" && got == "before after" {
				t.Errorf("%s(%q) shows nothing", c.name, s)
			}
		}
	}
}

// TestStatusEscapes: what the status and heal answers print from the device list, the ledger
// and the homeserver goes through escape or escapeText: a hostile device ID, heal class and
// error render as text.
func TestStatusEscapes(t *testing.T) {
	f := newCommandFixture(t)
	evil := &id.Device{UserID: cmdAlice, DeviceID: id.DeviceID(hostile[0] + hostile[1] + hostile[6]), IdentityKey: id.IdentityKey(hostile[5])}
	if err := f.mach.CryptoStore.PutDevices(f.ctx, cmdAlice, map[id.DeviceID]*id.Device{f.phone.DeviceID: f.phone, evil.DeviceID: evil}); err != nil {
		t.Fatal(err)
	}
	dev := unwedge.LedgerDevice{UserID: cmdAlice, DeviceID: evil.DeviceID, IdentityKey: evil.IdentityKey}
	grant, err := f.udb.Ledger.AcquireDevice(f.ctx, dev, unwedge.AcquireParams{Now: time.Now(), MinInterval: time.Hour, Owner: "o", Lease: time.Minute, Class: unwedge.Class(hostile[2])})
	if err != nil || !grant.Granted {
		t.Fatalf("acquire: %+v, %v", grant, err)
	}
	if err = f.udb.Ledger.FinishHeal(f.ctx, unwedge.HealRef{Device: dev, Owner: "o", HealID: grant.HealID}, unwedge.HealEnd{Outcome: unwedge.HealFailedPermanent, Attempts: 1, Err: hostile[3] + hostile[7] + hostile[8], At: time.Now()}); err != nil {
		t.Fatal(err)
	}
	f.bot.answers = nil
	f.run(cmdManagement, "status", string(cmdAlice))
	f.run(cmdManagement, "heal", string(cmdAlice), string(evil.DeviceID))
	f.run(cmdManagement, "heal", string(cmdAlice), "NO*SUCH*DEVICE[x](y)")
	for _, answer := range f.bot.answers {
		for _, tag := range htmlTags.FindAllString(answer.FormattedBody, -1) {
			switch tag {
			case "<code>", "</code>", "<ul>", "</ul>", "<li>", "</li>", "<strong>", "</strong>", "<p>", "</p>", "<br>":
			default:
				t.Errorf("answer renders %q:\n%s", tag, answer.FormattedBody)
			}
		}
		for _, inert := range []string{"*bold*", "[link](https://evil.example)", "&lt;script&gt;", "![image](mxc://evil/x)"} {
			if strings.Contains(answer.Body, strings.ReplaceAll(inert, "&lt;", "<")) && !strings.Contains(answer.FormattedBody, inert) {
				t.Errorf("answer shows %q but its HTML does not:\n%s", inert, answer.FormattedBody)
			}
		}
	}
}
