package bridge

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"

	"maunium.net/go/mautrix/bridgev2/commands"
	"maunium.net/go/mautrix/format"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// CommandHandler is the `unwedge` command: `status [user]`, `pending [user|all]` and
// `heal [--force] <user> <device>`. bridgev2 runs commands only for users with the `commands`
// permission level or higher (bridge.permissions); of those, anyone may ask about their own
// devices, and other users' devices, `pending all` and heals need the `admin` level. It answers
// only in the sender's management room: its answers name devices, identity keys and sessions.
func (h *Helper) CommandHandler() *commands.FullHandler {
	return &commands.FullHandler{
		Func: h.handleCommand,
		Name: "unwedge",
		Help: commands.HelpMeta{
			Section:     commands.HelpSectionAdmin,
			Description: "Show and repair the bridge's encrypted sessions with your devices (admins: anyone's).",
			Args:        "status [_user_] | pending [_user_|all] | heal [--force] <_user_> <_device_>",
		},
	}
}

const commandUsage = "Usage: `$cmdprefix unwedge status [user]`, `$cmdprefix unwedge pending [user|all]` or `$cmdprefix unwedge heal [--force] <user> <device>`"

// notManagementRoom is the whole answer outside the sender's management room.
const notManagementRoom = "Use `unwedge` in your management room (a room with only you and the bridge bot): its answers name devices and keys."

// inManagementRoom reports whether a command came from the sender's management room (bridgev2:
// the room with only the user and the bot that the bot marked when it was invited, or that
// `set-management-room` marked), where the answer goes too (ce.OrigRoomID).
func inManagementRoom(ce *commands.Event) bool {
	return ce.User != nil && ce.User.User != nil && ce.User.ManagementRoom != "" &&
		ce.OrigRoomID == ce.User.ManagementRoom && ce.RoomID == ce.User.ManagementRoom
}

func (h *Helper) handleCommand(ce *commands.Event) {
	if !inManagementRoom(ce) {
		// A portal's other members would read the answer: no device data, not even whether
		// unwedge runs.
		ce.Reply(notManagementRoom)
		return
	}
	if h.unwedger == nil {
		ce.Reply("unwedge is not running.")
		return
	}
	if len(ce.Args) == 0 {
		ce.Reply(commandUsage)
		return
	}
	sub, args := strings.ToLower(ce.Args[0]), ce.Args[1:]
	switch sub {
	case "status", "pending":
		if len(args) > 1 || sub == "status" && len(args) == 1 && args[0] == "all" {
			ce.Reply(commandUsage)
			return
		}
		target, ok := h.commandTarget(ce, args)
		if !ok {
			return
		}
		if sub == "status" {
			reply(ce, h.statusReport(ce.Ctx, target))
		} else {
			reply(ce, h.pendingReport(ce.Ctx, target))
		}
	case "heal":
		force, positional := false, make([]string, 0, len(args))
		for _, arg := range args {
			if arg == "--force" {
				force = true
			} else {
				positional = append(positional, arg)
			}
		}
		if len(positional) != 2 {
			ce.Reply(commandUsage)
			return
		} else if !ce.User.Permissions.Admin {
			ce.Reply("Only bridge admins can heal a device.")
			return
		}
		userID := id.UserID(positional[0])
		if _, _, err := userID.Parse(); err != nil {
			reply(ce, fmt.Sprintf("%s is not a Matrix user ID.", escape(positional[0])))
			return
		}
		h.healCommand(ce, userID, id.DeviceID(positional[1]), force)
	default:
		ce.Reply(commandUsage)
	}
}

// commandTarget is the user a status or pending command is about: the sender by default; another
// user only for admins ("all" lists everyone's pending events).
func (h *Helper) commandTarget(ce *commands.Event, args []string) (id.UserID, bool) {
	if len(args) == 0 {
		return ce.User.MXID, true
	}
	target := id.UserID(args[0])
	if args[0] == "all" {
		target = ""
	} else if _, _, err := target.Parse(); err != nil {
		reply(ce, fmt.Sprintf("%s is not a Matrix user ID.", escape(args[0])))
		return "", false
	}
	if target != ce.User.MXID && !ce.User.Permissions.Admin {
		ce.Reply("Only bridge admins can see other users' sessions.")
		return "", false
	}
	return target, true
}

// statusHeals is how many of a user's heals statusReport reads from the ledger, and
// statusEarlierHeals how many it lists per device after the last one.
const (
	statusHeals        = 200
	statusEarlierHeals = 3
)

// statusReport lists a user's devices, what unwedge decided and did about each, and their pending
// events. Heals come from the ledger (the unwedge_heal table: they survive restarts and are the
// same on every replica); decisions that are not heals (limited, capped, out_of_scope,
// unknown_device) only from this process's memory, since it started, and are shown when newer.
func (h *Helper) statusReport(ctx context.Context, userID id.UserID) string {
	var b strings.Builder
	fmt.Fprintf(&b, "**unwedge status of %s**\n\n", escapeText(userID))
	devices, err := h.mach.CryptoStore.GetDevices(ctx, userID)
	if err != nil {
		fmt.Fprintf(&b, "Failed to read devices: %s\n", escapeText(err.Error()))
	}
	heals, err := h.db.Ledger.Heals(ctx, userID, "", statusHeals)
	if err != nil {
		fmt.Fprintf(&b, "Failed to read the heal history: %s\n", escapeText(err.Error()))
	}
	var recent []unwedge.Decision
	if h.unwedger != nil {
		recent = h.unwedger.Recent(userID)
	}
	// The devices the bridge knows, and those only the heal history still names (deleted since).
	keys := map[id.DeviceID]id.IdentityKey{}
	for deviceID, dev := range devices {
		keys[deviceID] = dev.IdentityKey
	}
	gone := map[id.DeviceID]bool{}
	for _, heal := range heals {
		if _, ok := keys[heal.Device.DeviceID]; !ok {
			keys[heal.Device.DeviceID] = heal.Device.IdentityKey
			gone[heal.Device.DeviceID] = true
		}
	}
	if len(keys) == 0 {
		b.WriteString("The bridge knows no devices of this user, and unwedge healed none.\n")
	}
	shown := map[id.SenderKey]bool{}
	for _, deviceID := range sortedDeviceIDs(keys) {
		key := keys[deviceID]
		shown[key] = true
		fmt.Fprintf(&b, "* device %s (identity key %s)", escape(deviceID), escape(key))
		if gone[deviceID] {
			b.WriteString(", no longer among the user's devices")
		}
		b.WriteString("\n")
		var deviceHeals []*unwedge.HealRecord
		for _, heal := range heals {
			if heal.Device.DeviceID == deviceID {
				deviceHeals = append(deviceHeals, heal)
			}
		}
		last, fromMemory := lastDecision(recent, key, deviceHeals)
		if last != nil {
			fmt.Fprintf(&b, "  * last decision: %s (%s) %s ago%s", escapeText(last.Action), escapeText(last.Class), since(last.At), detail(*last))
			if fromMemory {
				b.WriteString(" (remembered by this bridge process)")
			}
			b.WriteString("\n")
		}
		for i, heal := range deviceHeals {
			if i > statusEarlierHeals {
				fmt.Fprintf(&b, "  * ... %d earlier heal(s) in the heal history\n", len(deviceHeals)-i)
				break
			}
			label := "last replacement session"
			if i > 0 {
				label = "earlier heal"
			}
			fmt.Fprintf(&b, "  * %s: %s\n", label, describeHeal(heal))
		}
	}
	// Decisions about identity keys that are none of the devices above (unknown_device).
	for _, d := range recent {
		if !shown[d.Key] {
			shown[d.Key] = true
			fmt.Fprintf(&b, "* identity key %s, no known device of this user\n  * last decision: %s (%s) %s ago%s (remembered by this bridge process)\n",
				escape(d.Key), escapeText(d.Action), escapeText(d.Class), since(d.At), detail(d))
		}
	}
	const countLimit = 1000
	pending, err := h.db.Pending.List(ctx, userID, countLimit)
	switch {
	case err != nil:
		fmt.Fprintf(&b, "\nFailed to read pending events: %s\n", escapeText(err.Error()))
	case len(pending) >= countLimit:
		fmt.Fprintf(&b, "\nMessages waiting for their keys: %d or more\n", countLimit)
	default:
		fmt.Fprintf(&b, "\nMessages waiting for their keys: %d\n", len(pending))
	}
	return b.String()
}

// lastDecision is the newest of what this process remembers deciding about the identity key and
// the device's newest heal in the ledger (as the decision it ended with); fromMemory tells which.
func lastDecision(recent []unwedge.Decision, key id.SenderKey, heals []*unwedge.HealRecord) (last *unwedge.Decision, fromMemory bool) {
	for i := range recent {
		if recent[i].Key == key {
			last, fromMemory = &recent[i], true
			break
		}
	}
	if len(heals) > 0 {
		if d := heals[0].Decision(); last == nil || d.At.After(last.At) {
			return &d, false
		}
	}
	return last, fromMemory
}

// describeHeal is one heal of the history: outcome, class, when, session, who forced it, error.
func describeHeal(heal *unwedge.HealRecord) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s (%s) %s ago", escapeText(heal.Outcome), escapeText(heal.Class), since(heal.StartedAt))
	if heal.SessionID != "" {
		fmt.Fprintf(&b, ", session %s", escape(heal.SessionID))
	}
	if heal.ForcedBy != "" {
		fmt.Fprintf(&b, ", forced by %s", escapeText(heal.ForcedBy))
	}
	if heal.Attempts > 0 {
		fmt.Fprintf(&b, ", %d attempt(s)", heal.Attempts)
	}
	if heal.Error != "" {
		fmt.Fprintf(&b, ", error: %s", escapeText(heal.Error))
	}
	return b.String()
}

// pendingReport lists events waiting for their keys (of one user, or all when userID is empty).
func (h *Helper) pendingReport(ctx context.Context, userID id.UserID) string {
	const limit = 50
	pending, err := h.db.Pending.List(ctx, userID, limit+1)
	if err != nil {
		return fmt.Sprintf("Failed to read pending events: %s", escapeText(err.Error()))
	}
	who := "all users"
	if userID != "" {
		who = escapeText(userID)
	}
	if len(pending) == 0 {
		return fmt.Sprintf("No messages of %s are waiting for their keys.", who)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "**Messages of %s waiting for their keys** (oldest first)\n\n", who)
	for i, p := range pending {
		if i == limit {
			fmt.Fprintf(&b, "* ... and more (only the first %d are listed)\n", limit)
			break
		}
		fmt.Fprintf(&b, "* %s in %s from %s, session %s: waiting %s, %d key request(s)", escape(p.EventID), escape(p.RoomID), escapeText(p.Sender), escape(p.SessionID), since(p.FirstSeen), p.Requests)
		if p.LastError != "" {
			fmt.Fprintf(&b, ", last error: %s", escapeText(p.LastError))
		}
		b.WriteString("\n")
	}
	return b.String()
}

// forcedHealWindow is how often an admin may force a heal of one device: every forced heal
// claims one of its one-time keys, so repeating `unwedge heal --force` must not drain them.
const forcedHealWindow = 5 * time.Minute

// healCommand heals a device an admin named. Without force it is the heal a wedge would get
// (unwedge's scope, max_heals_per_user and min_interval apply; Unwedger.HealRequested); with
// force those are skipped and the ledger records who forced it, but a device gets at most one
// forced heal per forcedHealWindow.
func (h *Helper) healCommand(ce *commands.Event, userID id.UserID, deviceID id.DeviceID, force bool) {
	device, err := h.mach.GetOrFetchDevice(ce.Ctx, userID, deviceID)
	if err != nil || device == nil {
		why := "the homeserver does not list it"
		if err != nil {
			why = escapeText(err.Error())
		}
		reply(ce, fmt.Sprintf("Device %s of %s not found: %s", escape(deviceID), escapeText(userID), why))
		return
	}
	ce.Log.Info().Stringer("requested_by", ce.User.MXID).Stringer("user_id", userID).Stringer("device_id", deviceID).
		Bool("force", force).Msg("Admin asked for a heal")
	dev := fmt.Sprintf("%s of %s", escape(deviceID), escapeText(userID))
	if force {
		release, last, err := h.reserveForcedHeal(ce.Ctx, userID, deviceID, time.Now())
		if err != nil {
			reply(ce, fmt.Sprintf("Not healed: failed to read the heal history: %s", escapeText(err.Error())))
			return
		} else if release == nil {
			reply(ce, fmt.Sprintf("Not healed: device %s had a forced heal %s ago; a device gets at most one forced heal per %s, so that repeating it cannot use up its one-time keys.",
				dev, since(last), forcedHealWindow))
			return
		}
		d := h.unwedger.HealRequested(ce.Ctx, device, ce.User.MXID, true)
		if d.Action.Refused() {
			release() // refused by the ledger (a heal holds the device): no key was claimed
		}
		replyHeal(ce, dev, d)
		return
	}
	replyHeal(ce, dev, h.unwedger.HealRequested(ce.Ctx, device, ce.User.MXID, false))
}

// replyHeal tells the admin how a heal they asked for ended, or why there was none.
func replyHeal(ce *commands.Event, dev string, d unwedge.Decision) {
	why := escapeText(d.Detail)
	if d.Err != nil {
		if why != "" {
			why += ": "
		}
		why += escapeText(d.Err.Error())
	}
	switch d.Action {
	case unwedge.ActionHealed:
		reply(ce, fmt.Sprintf("Created a new Olm session with device %s and sent m.dummy over it; the keys the bridge was missing from it are requested again.", dev))
	case unwedge.ActionDeferred:
		reply(ce, fmt.Sprintf("Created a new Olm session with device %s; m.dummy is not sent yet (%s), it is sent when the homeserver answers.", dev, why))
	case unwedge.ActionOutOfScope:
		reply(ce, fmt.Sprintf("Not healed: the user of device %s is outside unwedge's scope (%s). `unwedge heal --force` heals anyway.", dev, why))
	case unwedge.ActionKeyConflict:
		reply(ce, fmt.Sprintf("Not healed: %s. A session made with device %s would be stored under an identity key another device lists too; check which device is genuine, then `unwedge heal --force` heals it.", why, dev))
	case unwedge.ActionCapped, unwedge.ActionLimited, unwedge.ActionThrottled:
		reply(ce, fmt.Sprintf("Not healed: device %s is %s: %s. (`unwedge heal --force` skips min\\_interval, max\\_heals\\_per\\_user and max\\_heals\\_per\\_minute, not a running heal, at most once per device per %s.)",
			dev, escapeText(string(d.Action)), why, forcedHealWindow))
	default:
		reply(ce, fmt.Sprintf("Heal of device %s failed: %s", dev, why))
	}
}

type forcedHealKey struct {
	user   id.UserID
	device id.DeviceID
}

// forcedHeals holds the forced heals this helper started within forcedHealWindow; the ledger
// holds those of every process (their heal rows, with forced_by).
type forcedHeals struct {
	sync.Mutex
	at map[forcedHealKey]time.Time
}

// reserveForcedHeal reserves the device's forced heal for this window, or returns a nil release
// and when the last forced heal started: one this process reserved, or the newest in the ledger
// with forced_by (forced by any process or replica, also before a restart). release undoes the
// reservation, for a heal that claimed no key.
func (h *Helper) reserveForcedHeal(ctx context.Context, userID id.UserID, deviceID id.DeviceID, now time.Time) (release func(), last time.Time, err error) {
	forced := &h.forcedHeals
	forced.Lock()
	defer forced.Unlock()
	if forced.at == nil {
		forced.at = make(map[forcedHealKey]time.Time)
	}
	for key, at := range forced.at {
		if now.Sub(at) >= forcedHealWindow {
			delete(forced.at, key)
		}
	}
	key := forcedHealKey{userID, deviceID}
	if at, ok := forced.at[key]; ok {
		return nil, at, nil
	}
	heals, err := h.db.Ledger.Heals(ctx, userID, deviceID, 50)
	if err != nil {
		return nil, time.Time{}, err
	}
	for _, heal := range heals {
		if now.Sub(heal.StartedAt) >= forcedHealWindow {
			break // newest first
		}
		if heal.ForcedBy != "" {
			return nil, heal.StartedAt, nil
		}
	}
	forced.at[key] = now
	return func() {
		forced.Lock()
		defer forced.Unlock()
		if forced.at[key] == now {
			delete(forced.at, key)
		}
	}, time.Time{}, nil
}

// reply sends a report as markdown as it is: no $cmdprefix replacement or formatting of what the
// values in it (escaped) might contain.
func reply(ce *commands.Event, markdown string) {
	ce.ReplyAdvanced(markdown, true, false)
}

// escape renders a value that a remote peer, a homeserver or another user controls (device and
// session IDs, identity keys, room and event IDs) as an inline code span: nothing in it is markdown
// or HTML, and control characters (line breaks) become spaces, so it cannot end the code span,
// the line or the list item.
func escape[T ~string](s T) string {
	return format.SafeMarkdownCode(oneLine(string(s)))
}

// markdownPunctuation is what CommonMark lets a backslash escape: all ASCII punctuation.
const markdownPunctuation = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"

// escapeText renders text that others control (error texts, the reasons in decisions, user
// IDs, classes and outcomes read from the shared database) as literal text: every ASCII
// punctuation character is backslash-escaped and control characters become spaces.
func escapeText[T ~string](s T) string {
	var b strings.Builder
	for _, r := range oneLine(string(s)) {
		if r < 0x80 && strings.ContainsRune(markdownPunctuation, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// oneLine replaces control characters and Unicode line and paragraph separators by spaces.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			return ' '
		}
		return r
	}, s)
}

func sortedDeviceIDs[T any](devices map[id.DeviceID]T) []id.DeviceID {
	ids := make([]id.DeviceID, 0, len(devices))
	for deviceID := range devices {
		ids = append(ids, deviceID)
	}
	slices.Sort(ids)
	return ids
}

func since(t time.Time) string {
	return time.Since(t).Round(time.Second).String()
}

func detail(d unwedge.Decision) string {
	if d.Detail == "" {
		return ""
	}
	return ": " + escapeText(d.Detail)
}
