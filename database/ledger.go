package database

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

const (
	// The MSC1719 decision in one statement: the row is created or taken over only when no live
	// lease holds it and (unless forced) the interval since our last session and last permanent
	// failure has passed. Concurrent callers on any number of processes get at most one row back.
	acquireQuery = `
		INSERT INTO unwedge_device (bridge_id, user_id, device_id, identity_key, lease_owner, lease_until)
		VALUES ($1, $2, $3, $4, $5, $6)
		ON CONFLICT (bridge_id, user_id, device_id, identity_key) DO UPDATE
			SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until
			WHERE unwedge_device.lease_until < $7
				AND ($8 OR (unwedge_device.last_created_at <= $9 AND unwedge_device.last_failed_at <= $9))
		RETURNING last_created_at`
	getDeviceQuery = `
		SELECT last_created_at, last_failed_at, lease_owner, lease_until FROM unwedge_device
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4`
	insertHealQuery = `
		INSERT INTO unwedge_heal (bridge_id, user_id, device_id, identity_key, class, forced_by, started_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id`
	setHealIDQuery = `
		UPDATE unwedge_device SET heal_id = $6
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND lease_owner = $5`
	renewLeaseQuery = `
		UPDATE unwedge_device SET lease_until = $6
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND lease_owner = $5`
	sessionCreatedDeviceQuery = `
		UPDATE unwedge_device SET last_created_at = $6, last_session_id = $7
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND lease_owner = $5`
	sessionCreatedHealQuery = `UPDATE unwedge_heal SET session_id = $2 WHERE id = $1`
	// A discarded session ($8, HealEnd.Discarded) that is still the device's last one is
	// forgotten: the interval does not run from a session no peer can know.
	finishDeviceQuery = `
		UPDATE unwedge_device SET lease_owner = '', lease_until = 0,
			last_failed_at = CASE WHEN $6 THEN $7 ELSE last_failed_at END,
			last_created_at = CASE WHEN $8 <> '' AND last_session_id = $8 THEN 0 ELSE last_created_at END,
			last_session_id = CASE WHEN $8 <> '' AND last_session_id = $8 THEN '' ELSE last_session_id END
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND lease_owner = $5`
	finishHealQuery     = `UPDATE unwedge_heal SET outcome = $2, finished_at = $3, attempts = $4, error = $5 WHERE id = $1`
	postponeDeviceQuery = `
		UPDATE unwedge_device SET lease_until = 0
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND lease_owner = $5 AND heal_id = $6`
	supersedeHealsQuery = `
		UPDATE unwedge_heal SET outcome = 'failed_transient', finished_at = $6, error = $7
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND outcome = 'in_progress' AND id <> $5`
	postponeHealQuery = `UPDATE unwedge_heal SET attempts = $2, error = $3 WHERE id = $1`
	// On Postgres the two records of a created session are one statement: data-modifying CTEs
	// on different tables. One round trip instead of two, on the path from a wedge to its m.dummy.
	sessionCreatedPostgresQuery = `
		WITH d AS (
			UPDATE unwedge_device SET last_created_at = $6, last_session_id = $7
			WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND lease_owner = $5
		)
		UPDATE unwedge_heal SET session_id = $7 WHERE id = $8`
	healColumns    = `id, user_id, device_id, identity_key, class, forced_by, started_at, finished_at, outcome, session_id, attempts, error`
	listHealsQuery = `
		SELECT ` + healColumns + ` FROM unwedge_heal
		WHERE bridge_id = $1 AND user_id = $2 AND ($3 = '' OR device_id = $3) ORDER BY started_at DESC, id DESC LIMIT $4`
	unfinishedHealsQuery = `
		SELECT ` + healColumns + ` FROM unwedge_heal WHERE bridge_id = $1 AND outcome = 'in_progress' ORDER BY id`
	resumeQuery = `
		UPDATE unwedge_device SET lease_owner = $6, lease_until = $7
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND identity_key = $4 AND heal_id = $5 AND lease_until < $8`
	countCreatedQuery = `
		SELECT COUNT(*) FROM unwedge_heal
		WHERE bridge_id = $1 AND user_id = $2 AND device_id = $3 AND session_id <> '' AND started_at >= $4`
	// Both caps of a heal's admission in one round trip; heals at startup ($5, $6: their classes)
	// count towards neither.
	countRecentHealsQuery = `
		SELECT
			(SELECT COUNT(*) FROM unwedge_heal WHERE bridge_id = $1 AND user_id = $2 AND forced_by = '' AND started_at >= $3 AND class NOT IN ($5, $6)),
			(SELECT COUNT(*) FROM unwedge_heal WHERE bridge_id = $1 AND started_at >= $4 AND class NOT IN ($5, $6))`
	pruneHealsQuery   = `DELETE FROM unwedge_heal WHERE bridge_id = $1 AND started_at < $2 AND outcome <> 'in_progress'`
	pruneDevicesQuery = `
		DELETE FROM unwedge_device WHERE bridge_id = $1 AND last_created_at < $2 AND last_failed_at < $2 AND lease_until < $3`
)

// LedgerQuery records the replacement sessions unwedge creates, per device.
type LedgerQuery struct {
	BridgeID string
	db       *dbutil.Database
}

func (lq *LedgerQuery) deviceArgs(dev unwedge.LedgerDevice) []any {
	return []any{lq.BridgeID, dev.UserID, dev.DeviceID, dev.IdentityKey}
}

// Acquire decides, for each device (each listed once), whether unwedge may create a new session
// with it now and, if so, holds the device for the lease and opens a heal record. It returns one
// grant per device, in order. Postgres decides a whole group in three statements
// (ledgerbatch.go); SQLite, where a statement costs no round trip, runs acquireSQLite per device
// in one transaction.
func (lq *LedgerQuery) Acquire(ctx context.Context, devs []unwedge.LedgerDevice, p unwedge.AcquireParams) ([]*unwedge.Grant, error) {
	if lq.db.Dialect == dbutil.Postgres {
		return lq.acquirePostgres(ctx, devs, p)
	}
	grants := make([]*unwedge.Grant, len(devs))
	err := lq.db.DoTxn(ctx, nil, func(ctx context.Context) (err error) {
		for i, dev := range devs {
			if grants[i], err = lq.acquireSQLite(ctx, dev, p); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return grants, nil
}

// AcquireDevice is Acquire for one device: the batch of one.
func (lq *LedgerQuery) AcquireDevice(ctx context.Context, dev unwedge.LedgerDevice, p unwedge.AcquireParams) (*unwedge.Grant, error) {
	grants, err := lq.Acquire(ctx, []unwedge.LedgerDevice{dev}, p)
	if err != nil {
		return nil, err
	}
	return grants[0], nil
}

// acquireSQLite is Acquire's decision for one device on SQLite.
func (lq *LedgerQuery) acquireSQLite(ctx context.Context, dev unwedge.LedgerDevice, p unwedge.AcquireParams) (*unwedge.Grant, error) {
	now := p.Now.UnixMilli()
	args := append(lq.deviceArgs(dev), p.Owner, p.Now.Add(p.Lease).UnixMilli(), now, p.Force, p.Now.Add(-p.MinInterval).UnixMilli())
	var lastCreated int64
	err := lq.db.QueryRow(ctx, acquireQuery, args...).Scan(&lastCreated)
	if errors.Is(err, sql.ErrNoRows) {
		return lq.refusal(ctx, dev)
	} else if err != nil {
		return nil, fmt.Errorf("failed to acquire device: %w", err)
	}
	grant := &unwedge.Grant{Granted: true, LastCreatedAt: msTime(lastCreated)}
	err = lq.db.QueryRow(ctx, insertHealQuery, append(lq.deviceArgs(dev), p.Class, p.ForcedBy, now)...).Scan(&grant.HealID)
	if err != nil {
		return nil, fmt.Errorf("failed to record heal: %w", err)
	}
	if _, err = lq.db.Exec(ctx, setHealIDQuery, append(lq.deviceArgs(dev), p.Owner, grant.HealID)...); err != nil {
		return nil, fmt.Errorf("failed to link heal to device: %w", err)
	}
	// An earlier heal of the device that is still in progress (left by a dead process, or
	// waiting for the homeserver when an admin forces a new one) can no longer be resumed.
	if _, err = lq.db.Exec(ctx, supersedeHealsQuery, append(lq.deviceArgs(dev), grant.HealID, now, fmt.Sprintf("superseded by heal %d", grant.HealID))...); err != nil {
		return nil, fmt.Errorf("failed to close superseded heals: %w", err)
	}
	return grant, nil
}

func (lq *LedgerQuery) refusal(ctx context.Context, dev unwedge.LedgerDevice) (*unwedge.Grant, error) {
	var lastCreated, lastFailed, leaseUntil int64
	grant := &unwedge.Grant{}
	err := lq.db.QueryRow(ctx, getDeviceQuery, lq.deviceArgs(dev)...).Scan(&lastCreated, &lastFailed, &grant.LeaseOwner, &leaseUntil)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("failed to read device after refusal: %w", err)
	}
	grant.LastCreatedAt, grant.LastFailedAt, grant.LeaseUntil = msTime(lastCreated), msTime(lastFailed), msTime(leaseUntil)
	return grant, nil
}

// RecentHeals counts, in one query, the automatic heals of the user's devices started at or
// after userSince (forced ones are not counted), for the per-user cap, and the heals of all
// devices, automatic and forced, started at or after allSince (by every replica on the
// database), for the bridge's cap on heals per minute. Heals at startup count towards neither:
// the caps bound what peers make the bridge do, and the bridge starts those on its own.
func (lq *LedgerQuery) RecentHeals(ctx context.Context, userID id.UserID, userSince, allSince time.Time) (counts unwedge.HealCounts, err error) {
	err = lq.db.QueryRow(ctx, countRecentHealsQuery, lq.BridgeID, userID, userSince.UnixMilli(), allSince.UnixMilli(),
		unwedge.ClassRolledBack, unwedge.ClassSessionLost).Scan(&counts.User, &counts.All)
	if err != nil {
		return counts, fmt.Errorf("failed to count recent heals: %w", err)
	}
	return counts, nil
}

// RenewLease extends the lease of a heal that is still retrying.
func (lq *LedgerQuery) RenewLease(ctx context.Context, ref unwedge.HealRef, until time.Time) error {
	_, err := lq.db.Exec(ctx, renewLeaseQuery, append(lq.deviceArgs(ref.Device), ref.Owner, until.UnixMilli())...)
	return err
}

// SessionCreated records that unwedge created a replacement session: from now the interval runs.
func (lq *LedgerQuery) SessionCreated(ctx context.Context, ref unwedge.HealRef, sessionID id.SessionID, at time.Time) error {
	if lq.db.Dialect == dbutil.Postgres {
		_, err := lq.db.Exec(ctx, sessionCreatedPostgresQuery, append(lq.deviceArgs(ref.Device), ref.Owner, at.UnixMilli(), sessionID, ref.HealID)...)
		return err
	}
	return lq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if _, err := lq.db.Exec(ctx, sessionCreatedDeviceQuery, append(lq.deviceArgs(ref.Device), ref.Owner, at.UnixMilli(), sessionID)...); err != nil {
			return err
		}
		_, err := lq.db.Exec(ctx, sessionCreatedHealQuery, ref.HealID, sessionID)
		return err
	})
}

// Finish releases the devices and records how each heal ended (refs[i] as ends[i]). A permanent
// failure also starts the interval, so the device is not retried until it passes. Postgres
// records a whole group in one statement (ledgerbatch.go); SQLite runs finishSQLite per heal in
// one transaction.
func (lq *LedgerQuery) Finish(ctx context.Context, refs []unwedge.HealRef, ends []unwedge.HealEnd) error {
	if len(refs) != len(ends) {
		return fmt.Errorf("%d heals with %d ends", len(refs), len(ends))
	}
	if lq.db.Dialect == dbutil.Postgres {
		return lq.finishPostgres(ctx, refs, ends)
	}
	return lq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for i, ref := range refs {
			if err := lq.finishSQLite(ctx, ref, ends[i]); err != nil {
				return err
			}
		}
		return nil
	})
}

// FinishHeal is Finish for one heal: the batch of one.
func (lq *LedgerQuery) FinishHeal(ctx context.Context, ref unwedge.HealRef, end unwedge.HealEnd) error {
	return lq.Finish(ctx, []unwedge.HealRef{ref}, []unwedge.HealEnd{end})
}

// finishSQLite is Finish for one heal on SQLite.
func (lq *LedgerQuery) finishSQLite(ctx context.Context, ref unwedge.HealRef, end unwedge.HealEnd) error {
	permanent := end.Outcome == unwedge.HealFailedPermanent
	if _, err := lq.db.Exec(ctx, finishDeviceQuery, append(lq.deviceArgs(ref.Device), ref.Owner, permanent, end.At.UnixMilli(), end.Discarded)...); err != nil {
		return fmt.Errorf("failed to release device: %w", err)
	}
	if _, err := lq.db.Exec(ctx, finishHealQuery, ref.HealID, end.Outcome, end.At.UnixMilli(), end.Attempts, end.Err); err != nil {
		return fmt.Errorf("failed to record heal outcome: %w", err)
	}
	return nil
}

// Postpone keeps a heal in progress but gives up its lease, so that ResumeHeals (in any process)
// finishes it later: its session exists and only m.dummy could not be sent yet.
func (lq *LedgerQuery) Postpone(ctx context.Context, ref unwedge.HealRef, attempts int, healErr string) error {
	return lq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if _, err := lq.db.Exec(ctx, postponeDeviceQuery, append(lq.deviceArgs(ref.Device), ref.Owner, ref.HealID)...); err != nil {
			return err
		}
		_, err := lq.db.Exec(ctx, postponeHealQuery, ref.HealID, attempts, healErr)
		return err
	})
}

func scanHeal(row dbutil.Scannable) (*unwedge.HealRecord, error) {
	var h unwedge.HealRecord
	var started, finished int64
	err := row.Scan(&h.ID, &h.Device.UserID, &h.Device.DeviceID, &h.Device.IdentityKey, &h.Class, &h.ForcedBy,
		&started, &finished, &h.Outcome, &h.SessionID, &h.Attempts, &h.Error)
	if err != nil {
		return nil, err
	}
	h.StartedAt, h.FinishedAt = msTime(started), msTime(finished)
	return &h, nil
}

// Heals lists the newest heals of a user (all devices when deviceID is empty).
func (lq *LedgerQuery) Heals(ctx context.Context, userID id.UserID, deviceID id.DeviceID, limit int) ([]*unwedge.HealRecord, error) {
	return dbutil.ConvertRowFn[*unwedge.HealRecord](scanHeal).NewRowIter(lq.db.Query(ctx, listHealsQuery, lq.BridgeID, userID, deviceID, limit)).AsList()
}

// UnfinishedHeals lists heals that a stopped process left in progress.
func (lq *LedgerQuery) UnfinishedHeals(ctx context.Context) ([]*unwedge.HealRecord, error) {
	return dbutil.ConvertRowFn[*unwedge.HealRecord](scanHeal).NewRowIter(lq.db.Query(ctx, unfinishedHealsQuery, lq.BridgeID)).AsList()
}

// Resume takes over the device of a heal that a stopped process left in progress, once that
// process's lease ran out; it reports whether owner now holds the device for the heal.
func (lq *LedgerQuery) Resume(ctx context.Context, heal *unwedge.HealRecord, owner string, now, until time.Time) (bool, error) {
	res, err := lq.db.Exec(ctx, resumeQuery, append(lq.deviceArgs(heal.Device), heal.ID, owner, until.UnixMilli(), now.UnixMilli())...)
	if err != nil {
		return false, fmt.Errorf("failed to take over heal %d: %w", heal.ID, err)
	}
	n, _ := res.RowsAffected()
	return n == 1, nil
}

// CountCreated counts the replacement sessions unwedge created with a device since a time.
func (lq *LedgerQuery) CountCreated(ctx context.Context, userID id.UserID, deviceID id.DeviceID, since time.Time) (count int, err error) {
	err = lq.db.QueryRow(ctx, countCreatedQuery, lq.BridgeID, userID, deviceID, since.UnixMilli()).Scan(&count)
	return
}

// Prune deletes heal records older than before, device rows whose last event is older than
// before and that no lease holds, and the records of Megolm sessions shared before before that
// no room uses any more, unwedge's and mautrix-go's crypto store's (pruneShared).
func (lq *LedgerQuery) Prune(ctx context.Context, before, now time.Time) (heals, devices int64, err error) {
	res, err := lq.db.Exec(ctx, pruneHealsQuery, lq.BridgeID, before.UnixMilli())
	if err != nil {
		return 0, 0, err
	}
	heals, _ = res.RowsAffected()
	res, err = lq.db.Exec(ctx, pruneDevicesQuery, lq.BridgeID, before.UnixMilli(), now.UnixMilli())
	if err != nil {
		return heals, 0, err
	}
	devices, _ = res.RowsAffected()
	return heals, devices, pruneShared(ctx, lq.db, lq.BridgeID, before)
}

func msTime(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}
