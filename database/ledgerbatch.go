package database

import (
	"context"
	"encoding/json"
	"fmt"

	"go.mau.fi/util/dbutil"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// The ledger's statements on Postgres for Acquire and Finish: the devices of a group of heals (one
// or up to unwedge.BatchDevices) go in as one JSON array, so a group is decided, opened and
// finished with a few statements instead of a few per device. Each does per device what its
// SQLite counterpart in ledger.go does.
const (
	batchInput = `json_to_recordset($2::json) AS t(user_id TEXT, device_id TEXT, identity_key TEXT)`
	// acquireQuery (SQLite) for each device; a device listed twice would be an error (unwedge lists
	// each once).
	acquireManyQuery = `
		INSERT INTO unwedge_device (bridge_id, user_id, device_id, identity_key, lease_owner, lease_until)
		SELECT $1, t.user_id, t.device_id, t.identity_key, $3, $4 FROM ` + batchInput + `
		ON CONFLICT (bridge_id, user_id, device_id, identity_key) DO UPDATE
			SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until
			WHERE unwedge_device.lease_until < $5
				AND ($6 OR (unwedge_device.last_created_at <= $7 AND unwedge_device.last_failed_at <= $7))
		RETURNING user_id, device_id, identity_key, last_created_at`
	// insertHealQuery, setHealIDQuery and supersedeHealsQuery (SQLite) for each device acquired.
	openHealsQuery = `
		WITH h AS (
			INSERT INTO unwedge_heal (bridge_id, user_id, device_id, identity_key, class, forced_by, started_at)
			SELECT $1, t.user_id, t.device_id, t.identity_key, $4, $5, $6 FROM ` + batchInput + `
			RETURNING id, user_id, device_id, identity_key
		), d AS (
			UPDATE unwedge_device AS dev SET heal_id = h.id FROM h
			WHERE dev.bridge_id = $1 AND dev.user_id = h.user_id AND dev.device_id = h.device_id
				AND dev.identity_key = h.identity_key AND dev.lease_owner = $3
		), s AS (
			UPDATE unwedge_heal AS old SET outcome = 'failed_transient', finished_at = $6, error = 'superseded by heal ' || h.id FROM h
			WHERE old.bridge_id = $1 AND old.user_id = h.user_id AND old.device_id = h.device_id
				AND old.identity_key = h.identity_key AND old.outcome = 'in_progress'
		)
		SELECT id, user_id, device_id, identity_key FROM h`
	// getDeviceQuery (SQLite) for each device refused.
	getDevicesQuery = `
		SELECT dev.user_id, dev.device_id, dev.identity_key, dev.last_created_at, dev.last_failed_at, dev.lease_owner, dev.lease_until
		FROM unwedge_device AS dev JOIN ` + batchInput + `
			ON dev.user_id = t.user_id AND dev.device_id = t.device_id AND dev.identity_key = t.identity_key
		WHERE dev.bridge_id = $1`
	// finishDeviceQuery and finishHealQuery for each heal, in one statement.
	finishManyQuery = `
		WITH t AS (
			SELECT * FROM json_to_recordset($2::json) AS t(user_id TEXT, device_id TEXT, identity_key TEXT, owner TEXT,
				heal_id BIGINT, outcome TEXT, attempts INTEGER, error TEXT, at BIGINT, discarded TEXT)
		), d AS (
			UPDATE unwedge_device AS dev SET lease_owner = '', lease_until = 0,
				last_failed_at = CASE WHEN t.outcome = 'failed_permanent' THEN t.at ELSE dev.last_failed_at END,
				last_created_at = CASE WHEN t.discarded <> '' AND dev.last_session_id = t.discarded THEN 0 ELSE dev.last_created_at END,
				last_session_id = CASE WHEN t.discarded <> '' AND dev.last_session_id = t.discarded THEN '' ELSE dev.last_session_id END
			FROM t
			WHERE dev.bridge_id = $1 AND dev.user_id = t.user_id AND dev.device_id = t.device_id
				AND dev.identity_key = t.identity_key AND dev.lease_owner = t.owner
		)
		UPDATE unwedge_heal AS h SET outcome = t.outcome, finished_at = t.at, attempts = t.attempts, error = t.error
		FROM t WHERE h.id = t.heal_id`
)

// batchDevice is a device as the batch statements read it from their JSON input.
type batchDevice struct {
	UserID      string `json:"user_id"`
	DeviceID    string `json:"device_id"`
	IdentityKey string `json:"identity_key"`
}

func toBatchDevice(dev unwedge.LedgerDevice) batchDevice {
	return batchDevice{UserID: string(dev.UserID), DeviceID: string(dev.DeviceID), IdentityKey: string(dev.IdentityKey)}
}

func batchJSON(v any) (string, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("failed to encode batch of devices: %w", err)
	}
	return string(data), nil
}

// acquirePostgres is Acquire on Postgres, with three statements for the group: the decision, the
// heal records of the devices granted, and the rows of those refused (for the reason).
func (lq *LedgerQuery) acquirePostgres(ctx context.Context, devs []unwedge.LedgerDevice, p unwedge.AcquireParams) ([]*unwedge.Grant, error) {
	grants := make([]*unwedge.Grant, len(devs))
	index := make(map[batchDevice]int, len(devs))
	input := make([]batchDevice, len(devs))
	for i, dev := range devs {
		input[i] = toBatchDevice(dev)
		index[input[i]] = i
	}
	all, err := batchJSON(input)
	if err != nil {
		return nil, err
	}
	now := p.Now.UnixMilli()
	rows, err := lq.db.Query(ctx, acquireManyQuery, lq.BridgeID, all, p.Owner, p.Now.Add(p.Lease).UnixMilli(), now, p.Force, p.Now.Add(-p.MinInterval).UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("failed to acquire devices: %w", err)
	}
	var acquired []batchDevice
	err = scanBatch(rows, func(row dbutil.Scannable) error {
		var d batchDevice
		var lastCreated int64
		if err := row.Scan(&d.UserID, &d.DeviceID, &d.IdentityKey, &lastCreated); err != nil {
			return err
		}
		grants[index[d]] = &unwedge.Grant{Granted: true, LastCreatedAt: msTime(lastCreated)}
		acquired = append(acquired, d)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("failed to acquire devices: %w", err)
	}
	if len(acquired) > 0 {
		if all, err = batchJSON(acquired); err != nil {
			return nil, err
		}
		rows, err = lq.db.Query(ctx, openHealsQuery, lq.BridgeID, all, p.Owner, p.Class, p.ForcedBy, now)
		if err == nil {
			err = scanBatch(rows, func(row dbutil.Scannable) error {
				var d batchDevice
				var healID int64
				if err := row.Scan(&healID, &d.UserID, &d.DeviceID, &d.IdentityKey); err != nil {
					return err
				}
				grants[index[d]].HealID = healID
				return nil
			})
		}
		if err != nil {
			return nil, fmt.Errorf("failed to record heals: %w", err)
		}
	}
	if len(acquired) == len(devs) {
		return grants, nil
	}
	var refused []batchDevice
	for i, grant := range grants {
		if grant == nil {
			grants[i], refused = &unwedge.Grant{}, append(refused, input[i])
		}
	}
	if all, err = batchJSON(refused); err != nil {
		return nil, err
	}
	rows, err = lq.db.Query(ctx, getDevicesQuery, lq.BridgeID, all)
	if err == nil {
		err = scanBatch(rows, func(row dbutil.Scannable) error {
			var d batchDevice
			var lastCreated, lastFailed, leaseUntil int64
			var owner string
			if err := row.Scan(&d.UserID, &d.DeviceID, &d.IdentityKey, &lastCreated, &lastFailed, &owner, &leaseUntil); err != nil {
				return err
			}
			grant := grants[index[d]]
			grant.LastCreatedAt, grant.LastFailedAt, grant.LeaseOwner, grant.LeaseUntil = msTime(lastCreated), msTime(lastFailed), owner, msTime(leaseUntil)
			return nil
		})
	}
	if err != nil {
		return nil, fmt.Errorf("failed to read devices after refusal: %w", err)
	}
	return grants, nil
}

// finishPostgres is Finish on Postgres, in one statement for the group.
func (lq *LedgerQuery) finishPostgres(ctx context.Context, refs []unwedge.HealRef, ends []unwedge.HealEnd) error {
	type finished struct {
		batchDevice
		Owner     string `json:"owner"`
		HealID    int64  `json:"heal_id"`
		Outcome   string `json:"outcome"`
		Attempts  int    `json:"attempts"`
		Error     string `json:"error"`
		At        int64  `json:"at"`
		Discarded string `json:"discarded"`
	}
	input := make([]finished, len(refs))
	for i, ref := range refs {
		input[i] = finished{batchDevice: toBatchDevice(ref.Device), Owner: ref.Owner, HealID: ref.HealID,
			Outcome: string(ends[i].Outcome), Attempts: ends[i].Attempts, Error: ends[i].Err, At: ends[i].At.UnixMilli(),
			Discarded: string(ends[i].Discarded)}
	}
	all, err := batchJSON(input)
	if err != nil {
		return err
	}
	if _, err = lq.db.Exec(ctx, finishManyQuery, lq.BridgeID, all); err != nil {
		return fmt.Errorf("failed to record heal outcomes: %w", err)
	}
	return nil
}

// scanBatch scans every row and closes them.
func scanBatch(rows dbutil.Rows, scan func(dbutil.Scannable) error) error {
	defer rows.Close()
	for rows.Next() {
		if err := scan(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}
