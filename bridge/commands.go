package bridge

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"maunium.net/go/mautrix/bridgev2/commands"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
)

// CommandHandler is the `unwedge` command: `status [user]`, `pending [user|all]` and
// `heal <user> <device>`. bridgev2 runs commands only for users with the `commands` permission
// level or higher (bridge.permissions); of those, anyone may ask about their own devices, and
// other users' devices, `pending all` and forced heals need the `admin` level.
func (h *Helper) CommandHandler() *commands.FullHandler {
	return &commands.FullHandler{
		Func: h.handleCommand,
		Name: "unwedge",
		Help: commands.HelpMeta{
			Section:     commands.HelpSectionAdmin,
			Description: "Show and repair the bridge's encrypted sessions with your devices (admins: anyone's).",
			Args:        "status [_user_] | pending [_user_|all] | heal <_user_> <_device_>",
		},
	}
}

const commandUsage = "Usage: `$cmdprefix unwedge status [user]`, `$cmdprefix unwedge pending [user|all]` or `$cmdprefix unwedge heal <user> <device>`"

func (h *Helper) handleCommand(ce *commands.Event) {
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
			ce.Reply(h.statusReport(ce.Ctx, target))
		} else {
			ce.Reply(h.pendingReport(ce.Ctx, target))
		}
	case "heal":
		if len(args) != 2 {
			ce.Reply(commandUsage)
			return
		} else if !ce.User.Permissions.Admin {
			ce.Reply("Only bridge admins can force a heal.")
			return
		}
		h.forceHeal(ce, id.UserID(args[0]), id.DeviceID(args[1]))
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
		ce.Reply("%q is not a Matrix user ID.", args[0])
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
	fmt.Fprintf(&b, "**unwedge status of %s**\n\n", userID)
	devices, err := h.mach.CryptoStore.GetDevices(ctx, userID)
	if err != nil {
		fmt.Fprintf(&b, "Failed to read devices: %v\n", err)
	}
	heals, err := h.db.Ledger.Heals(ctx, userID, "", statusHeals)
	if err != nil {
		fmt.Fprintf(&b, "Failed to read the heal history: %v\n", err)
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
		fmt.Fprintf(&b, "* device `%s` (identity key `%s`)", deviceID, key)
		if gone[deviceID] {
			b.WriteString(", no longer among the user's devices")
		}
		b.WriteString("\n")
		var deviceHeals []*database.Heal
		for _, heal := range heals {
			if heal.Device.DeviceID == deviceID {
				deviceHeals = append(deviceHeals, heal)
			}
		}
		last, fromMemory := lastDecision(recent, key, deviceHeals)
		if last != nil {
			fmt.Fprintf(&b, "  * last decision: %s (%s) %s ago%s", last.Action, last.Class, since(last.At), detail(*last))
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
			fmt.Fprintf(&b, "* identity key `%s`, no known device of this user\n  * last decision: %s (%s) %s ago%s (remembered by this bridge process)\n",
				d.Key, d.Action, d.Class, since(d.At), detail(d))
		}
	}
	pending, err := h.db.Pending.List(ctx, userID, 1000)
	if err != nil {
		fmt.Fprintf(&b, "\nFailed to read pending events: %v\n", err)
	} else {
		fmt.Fprintf(&b, "\nMessages waiting for their keys: %d\n", len(pending))
	}
	return b.String()
}

// lastDecision is the newest of what this process remembers deciding about the identity key and
// the device's newest heal in the ledger (as the decision it ended with); fromMemory tells which.
func lastDecision(recent []unwedge.Decision, key id.SenderKey, heals []*database.Heal) (last *unwedge.Decision, fromMemory bool) {
	for i := range recent {
		if recent[i].Key == key {
			last, fromMemory = &recent[i], true
			break
		}
	}
	if len(heals) > 0 {
		if d := healDecision(heals[0]); last == nil || d.At.After(last.At) {
			return &d, false
		}
	}
	return last, fromMemory
}

// healDecision is the decision a heal in the ledger ended with, or is at: healed, failed,
// deferred (its session exists, m.dummy waits for the homeserver) or healing (still running).
func healDecision(heal *database.Heal) unwedge.Decision {
	d := unwedge.Decision{At: heal.StartedAt, Class: unwedge.Class(heal.Class), UserID: heal.Device.UserID, DeviceID: heal.Device.DeviceID,
		Key: heal.Device.IdentityKey, ForcedBy: heal.ForcedBy}
	if !heal.FinishedAt.IsZero() {
		d.At = heal.FinishedAt
	}
	switch {
	case heal.Outcome == database.HealHealed:
		d.Action = "healed"
		d.Detail = fmt.Sprintf("new Olm session %s after %d attempt(s)", heal.SessionID, heal.Attempts)
	case heal.Postponed():
		d.Action = "deferred"
		d.Detail = fmt.Sprintf("session %s created, m.dummy not sent yet after %d attempt(s): %s", heal.SessionID, heal.Attempts, heal.Error)
	case heal.Outcome == database.HealInProgress:
		d.Action = "healing"
		d.Detail = "a heal is running"
	default:
		d.Action = "failed"
		d.Detail = fmt.Sprintf("%s after %d attempt(s): %s", heal.Outcome, heal.Attempts, heal.Error)
	}
	return d
}

// describeHeal is one heal of the history: outcome, class, when, session, who forced it, error.
func describeHeal(heal *database.Heal) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s (%s) %s ago", heal.Outcome, heal.Class, since(heal.StartedAt))
	if heal.SessionID != "" {
		fmt.Fprintf(&b, ", session `%s`", heal.SessionID)
	}
	if heal.ForcedBy != "" {
		fmt.Fprintf(&b, ", forced by %s", heal.ForcedBy)
	}
	if heal.Attempts > 0 {
		fmt.Fprintf(&b, ", %d attempt(s)", heal.Attempts)
	}
	if heal.Error != "" {
		fmt.Fprintf(&b, ", error: %s", heal.Error)
	}
	return b.String()
}

// pendingReport lists events waiting for their keys (of one user, or all when userID is empty).
func (h *Helper) pendingReport(ctx context.Context, userID id.UserID) string {
	const limit = 50
	pending, err := h.db.Pending.List(ctx, userID, limit+1)
	if err != nil {
		return fmt.Sprintf("Failed to read pending events: %v", err)
	}
	who := "all users"
	if userID != "" {
		who = userID.String()
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
		fmt.Fprintf(&b, "* `%s` in `%s` from %s, session `%s`: waiting %s, %d key request(s)", p.EventID, p.RoomID, p.Sender, p.SessionID, since(p.FirstSeen), p.Requests)
		if p.LastError != "" {
			fmt.Fprintf(&b, ", last error: %s", p.LastError)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// forceHeal replaces the Olm session with a device now, ignoring the MSC1719 interval; the
// ledger records who forced it.
func (h *Helper) forceHeal(ce *commands.Event, userID id.UserID, deviceID id.DeviceID) {
	device, err := h.mach.GetOrFetchDevice(ce.Ctx, userID, deviceID)
	if err != nil || device == nil {
		ce.Reply("Device `%s` of %s not found: %v", deviceID, userID, err)
		return
	}
	outcome := h.unwedger.Heal(ce.Ctx, device, unwedge.ClassForced, ce.User.MXID)
	switch outcome {
	case database.HealHealed:
		ce.Reply("Created a new Olm session with `%s` of %s and sent m.dummy over it; the keys the bridge was missing from it are requested again.", deviceID, userID)
	case "":
		ce.Reply("Not healed: another heal of this device is in progress.")
	default:
		ce.Reply("Heal of `%s` of %s failed (%s); see the bridge log for the error.", deviceID, userID, outcome)
	}
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
	return ": " + d.Detail
}
