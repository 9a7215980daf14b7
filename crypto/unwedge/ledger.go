package unwedge

import (
	"context"
	"fmt"
	"time"

	"maunium.net/go/mautrix/id"
)

// Ledger records the replacement sessions unwedge creates and decides, atomically across
// goroutines, restarts and replicas, whether a device may get a new one now.
// LedgerQuery implements it on Postgres and SQLite.
type Ledger interface {
	// Acquire decides, for each device (each listed once), whether it may get a new session now;
	// it returns one grant per device, in order.
	Acquire(ctx context.Context, devs []LedgerDevice, p AcquireParams) ([]*Grant, error)
	RenewLease(ctx context.Context, ref HealRef, until time.Time) error
	SessionCreated(ctx context.Context, ref HealRef, sessionID id.SessionID, at time.Time) error
	// Finish ends each heal, refs[i] as ends[i].
	Finish(ctx context.Context, refs []HealRef, ends []HealEnd) error
	Postpone(ctx context.Context, ref HealRef, attempts int, healErr string) error
	Prune(ctx context.Context, before, now time.Time) (heals, devices int64, err error)
	UnfinishedHeals(ctx context.Context) ([]*HealRecord, error)
	Resume(ctx context.Context, heal *HealRecord, owner string, now, until time.Time) (bool, error)
	// RecentHeals counts the automatic heals of the user's devices started at or after userSince,
	// and the heals of all devices, forced ones too, started at or after allSince.
	RecentHeals(ctx context.Context, userID id.UserID, userSince, allSince time.Time) (HealCounts, error)
}

// HealCounts are the recent heals a heal's admission counts: of one user's devices (automatic
// ones), and of all devices.
type HealCounts struct {
	User, All int
}

// HealRef is a heal that an owner (a process) runs on a device, as the ledger granted it.
type HealRef struct {
	Device LedgerDevice
	Owner  string
	HealID int64
}

// HealEnd is how a heal ended, for the ledger.
type HealEnd struct {
	Outcome  HealOutcome
	Attempts int
	// Err is the last error's text, if it did not heal.
	Err string
	At  time.Time
	// Discarded names the heal's session when the crypto store never kept it and it died with a
	// bridge that stopped: nothing went over it and no peer can learn of it, so the device's
	// min_interval does not run from it (the ledger forgets the creation), and the next process
	// may heal the device again. A store that keeps failing while the bridge runs does not
	// discard: the interval then bounds the keys claimed.
	Discarded id.SessionID
}

// LedgerDevice identifies a peer device: a user's device with the identity key it had when
// unwedge acted on it (a re-created device with the same ID is another row).
type LedgerDevice struct {
	UserID      id.UserID
	DeviceID    id.DeviceID
	IdentityKey id.IdentityKey
}

// AcquireParams is what a heal asks the ledger for.
type AcquireParams struct {
	Now time.Time
	// MinInterval is the MSC1719 limit: no new session if unwedge created one (or failed for
	// good) within it. Force skips it (an admin's explicit heal), never the lease.
	MinInterval time.Duration
	Force       bool
	// Owner holds the device for Lease; another owner cannot heal it meanwhile.
	Owner string
	Lease time.Duration
	// Class and ForcedBy are recorded with the heal.
	Class    Class
	ForcedBy id.UserID
}

// Grant is the ledger's answer. When Granted is false, LastCreatedAt, LastFailedAt and LeaseOwner
// say why (read after the decision, for reporting only).
type Grant struct {
	Granted       bool
	HealID        int64
	LastCreatedAt time.Time
	LastFailedAt  time.Time
	LeaseOwner    string
	LeaseUntil    time.Time
}

// Reason says, for people, why the ledger refused a heal at now.
func (g *Grant) Reason(now time.Time, minInterval time.Duration) string {
	switch {
	case g.LeaseUntil.After(now):
		return fmt.Sprintf("a heal by %s holds the device until %s", g.LeaseOwner, g.LeaseUntil.Format(time.RFC3339))
	case !g.LastCreatedAt.IsZero() && now.Sub(g.LastCreatedAt) < minInterval:
		return fmt.Sprintf("a replacement session was created %s ago (at most one per %s)", now.Sub(g.LastCreatedAt).Round(time.Second), minInterval)
	case !g.LastFailedAt.IsZero() && now.Sub(g.LastFailedAt) < minInterval:
		return fmt.Sprintf("the last heal failed for good %s ago (retried after %s)", now.Sub(g.LastFailedAt).Round(time.Second), minInterval)
	}
	return "refused by the ledger"
}

// HealOutcome is how a heal ended.
type HealOutcome string

const (
	HealInProgress      HealOutcome = "in_progress"
	HealHealed          HealOutcome = "healed"
	HealFailedTransient HealOutcome = "failed_transient"
	HealFailedPermanent HealOutcome = "failed_permanent"
)

// HealRecord is one row of the heal history.
type HealRecord struct {
	ID         int64
	Device     LedgerDevice
	Class      Class
	ForcedBy   id.UserID
	StartedAt  time.Time
	FinishedAt time.Time
	Outcome    HealOutcome
	SessionID  id.SessionID
	Attempts   int
	Error      string
}

// Postponed reports whether Postpone kept the heal in progress at least once (only Postpone
// writes an error into a heal that is still in progress).
func (h *HealRecord) Postponed() bool { return h.Outcome == HealInProgress && h.Error != "" }
