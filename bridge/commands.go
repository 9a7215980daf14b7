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

// CommandHandler is the `unwedge` command: `status [user]`, `pending [user]` and
// `heal <user> <device>`. Anyone may ask about their own devices; other users' devices and
// forced heals need bridge admin permission.
func (h *Helper) CommandHandler() *commands.FullHandler {
	return &commands.FullHandler{
		Func: h.handleCommand,
		Name: "unwedge",
		Help: commands.HelpMeta{
			Section:     commands.HelpSectionAdmin,
			Description: "Show and repair the bridge's encrypted sessions with your devices (admins: anyone's).",
			Args:        "status [_user_] | pending [_user_] | heal <_user_> <_device_>",
		},
	}
}

const commandUsage = "Usage: `$cmdprefix unwedge status [user]`, `$cmdprefix unwedge pending [user]` or `$cmdprefix unwedge heal <user> <device>`"

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

// statusReport lists a user's devices, what unwedge saw and did lately, and their pending events.
func (h *Helper) statusReport(ctx context.Context, userID id.UserID) string {
	var b strings.Builder
	fmt.Fprintf(&b, "**unwedge status of %s**\n\n", userID)
	devices, err := h.mach.CryptoStore.GetDevices(ctx, userID)
	if err != nil {
		fmt.Fprintf(&b, "Failed to read devices: %v\n", err)
	}
	heals, err := h.db.Ledger.Heals(ctx, userID, "", 50)
	if err != nil {
		fmt.Fprintf(&b, "Failed to read heals: %v\n", err)
	}
	recent := h.unwedger.Recent(userID)
	if len(devices) == 0 {
		b.WriteString("The bridge knows no devices of this user.\n")
	}
	for _, deviceID := range sortedDeviceIDs(devices) {
		dev := devices[deviceID]
		fmt.Fprintf(&b, "* device `%s` (identity key `%s`)\n", deviceID, dev.IdentityKey)
		for _, d := range recent {
			if d.Key == dev.IdentityKey {
				fmt.Fprintf(&b, "  * last decision: %s (%s) %s ago%s\n", d.Action, d.Class, since(d.At), detail(d))
				break
			}
		}
		for _, heal := range heals {
			if heal.Device.DeviceID == deviceID {
				fmt.Fprintf(&b, "  * last replacement session: %s (%s) %s ago", heal.Outcome, heal.Class, since(heal.StartedAt))
				if heal.SessionID != "" {
					fmt.Fprintf(&b, ", session `%s`", heal.SessionID)
				}
				if heal.ForcedBy != "" {
					fmt.Fprintf(&b, ", forced by %s", heal.ForcedBy)
				}
				b.WriteString("\n")
				break
			}
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
