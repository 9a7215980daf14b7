package testclient_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

func TestExploreWedge(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	alice, bob, room := pair(t, ctx)
	snap := filepath.Join(t.TempDir(), "a.db")
	if err := alice.Snapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	exchange(t, ctx, bob, alice, room, "one")
	exchange(t, ctx, alice, bob, room, "two")
	if err := alice.Restore(ctx, snap); err != nil {
		t.Fatal(err)
	}
	_ = bob.RotateRoomKey(ctx, room)
	three, _ := bob.SendText(ctx, room, "three")
	start := time.Now()
	evt, dec, err := alice.WaitForEvent(ctx, room, three)
	t.Logf("three: dec=%v err=%v decErr=%v after %s", dec, err, alice.DecryptionError(three), time.Since(start))
	_ = evt
	time.Sleep(3 * time.Second)
	t.Logf("three later: decErr=%v", alice.DecryptionError(three))
	_ = bob.RotateRoomKey(ctx, room)
	four, _ := bob.SendText(ctx, room, "four")
	_, dec, err = alice.WaitForEvent(ctx, room, four)
	t.Logf("four: dec=%v err=%v decErr=%v", dec, err, alice.DecryptionError(four))
	t.Fail()
}
