package harness_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestClearBotDevices makes bot devices on a slot as bridges with empty databases do (MSC4190),
// and checks that ClearBotDevices deletes all of them, and nothing when there are none.
func TestClearBotDevices(t *testing.T) {
	env := testenv.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	slot, release, err := harness.AcquireSlot(ctx, env.SlotsDir)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	br, err := harness.NewBridge(harness.BridgeOptions{
		Binary: "unused", Dir: t.TempDir(), HomeserverURL: env.HomeserverURL, Domain: env.Domain, Slot: slot,
		DatabaseType: "sqlite3-fk-wal",
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err = br.ClearBotDevices(ctx); err != nil {
		t.Fatal(err)
	}
	client, err := mautrix.NewClient(env.HomeserverURL, br.BotMXID, slot.ASToken)
	if err != nil {
		t.Fatal(err)
	}
	client.SetAppServiceUserID = true
	// The slot's bot exists once a bridge ran on the slot; on a new homeserver this test may be
	// the first, and the homeserver refuses devices for a user the appservice never registered.
	_, _, err = client.Register(ctx, &mautrix.ReqRegister[any]{Username: br.BotMXID.Localpart(), Type: mautrix.AuthTypeAppservice, InhibitLogin: true})
	if err != nil && !errors.Is(err, mautrix.MUserInUse) {
		t.Fatal(err)
	}
	for _, dev := range []id.DeviceID{"LEFTOVER1", "LEFTOVER2", "LEFTOVER3"} {
		if err = client.CreateDeviceMSC4190(ctx, dev, "left by an earlier bridge"); err != nil {
			t.Fatal(err)
		}
	}
	client.DeviceID = "" // CreateDeviceMSC4190 made the client act as the device it created
	for _, want := range []int{3, 0} {
		if n, err := br.ClearBotDevices(ctx); err != nil || n != want {
			t.Errorf("ClearBotDevices() = %d, %v; want %d", n, err, want)
		}
	}
	if resp, err := client.GetDevicesInfo(ctx); err != nil || len(resp.Devices) != 0 {
		t.Errorf("the bot has devices after ClearBotDevices: %+v (%v)", resp, err)
	}
}
