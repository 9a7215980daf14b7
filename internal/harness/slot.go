// Package harness runs the reference bridge as a real process against the local stack started by
// scripts/stack.sh, for the end-to-end tests, the demo and the wedge lab.
package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/unwedge/unwedge/internal/envfile"
)

// Slot is one appservice registration that scripts/synapse.sh registered with the homeserver.
// A bridge process takes a slot's tokens, port and namespaces.
type Slot struct {
	Dir              string
	ID               string
	Port             int
	BotLocalpart     string
	UsernameTemplate string
	ASToken, HSToken string
}

// LoadSlot reads the slot.env that scripts/synapse.sh wrote in dir.
func LoadSlot(dir string) (*Slot, error) {
	vals, err := envfile.Read(filepath.Join(dir, "slot.env"))
	if err != nil {
		return nil, err
	}
	port, err := strconv.Atoi(vals["SLOT_PORT"])
	if err != nil {
		return nil, fmt.Errorf("invalid SLOT_PORT in %s: %w", dir, err)
	}
	slot := &Slot{
		Dir: dir, ID: vals["SLOT_ID"], Port: port, BotLocalpart: vals["SLOT_BOT_LOCALPART"],
		UsernameTemplate: vals["SLOT_USERNAME_TEMPLATE"], ASToken: vals["SLOT_AS_TOKEN"], HSToken: vals["SLOT_HS_TOKEN"],
	}
	if slot.ID == "" || slot.BotLocalpart == "" || slot.UsernameTemplate == "" || slot.ASToken == "" || slot.HSToken == "" {
		return nil, fmt.Errorf("incomplete slot.env in %s", dir)
	}
	return slot, nil
}

// AcquireSlot takes a free slot below slotsDir for the caller's process, waiting while all are in
// use by other tests, labs or commands. The slot is held with an advisory file lock until release.
func AcquireSlot(ctx context.Context, slotsDir string) (*Slot, func(), error) {
	entries, err := os.ReadDir(slotsDir)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to list slots: %w", err)
	}
	for {
		for _, entry := range entries {
			if !entry.IsDir() {
				continue
			}
			dir := filepath.Join(slotsDir, entry.Name())
			lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
			if err != nil {
				return nil, nil, err
			}
			if err = syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
				_ = lock.Close()
				continue
			}
			slot, err := LoadSlot(dir)
			if err != nil {
				_ = lock.Close()
				return nil, nil, err
			}
			return slot, func() { _ = lock.Close() }, nil
		}
		select {
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("no free slot in %s: %w", slotsDir, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
