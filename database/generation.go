package database

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

const (
	currentGenerationQuery = `SELECT identity_key, generation FROM unwedge_generation WHERE bridge_id = $1`
	// One statement, so replicas moving it on at once each get their own value.
	advanceGenerationQuery = `
		INSERT INTO unwedge_generation (bridge_id, identity_key, generation) VALUES ($1, $2, 1)
		ON CONFLICT (bridge_id) DO UPDATE SET
			generation = CASE WHEN unwedge_generation.identity_key = excluded.identity_key THEN unwedge_generation.generation + 1 ELSE 1 END,
			identity_key = excluded.identity_key
		RETURNING generation`
)

// GenerationQuery keeps the crypto store's generation in the bridge's database
// (unwedge.Generations).
type GenerationQuery struct {
	BridgeID string
	db       *dbutil.Database
}

var _ unwedge.Generations = (*GenerationQuery)(nil)

func (gq *GenerationQuery) Current(ctx context.Context) (unwedge.Generation, bool, error) {
	var gen unwedge.Generation
	err := gq.db.QueryRow(ctx, currentGenerationQuery, gq.BridgeID).Scan(&gen.IdentityKey, &gen.Value)
	if errors.Is(err, sql.ErrNoRows) {
		return unwedge.Generation{}, false, nil
	} else if err != nil {
		return unwedge.Generation{}, false, fmt.Errorf("failed to read the crypto generation: %w", err)
	}
	return gen, true, nil
}

func (gq *GenerationQuery) Advance(ctx context.Context, key id.IdentityKey) (unwedge.Generation, error) {
	gen := unwedge.Generation{IdentityKey: key}
	if err := gq.db.QueryRow(ctx, advanceGenerationQuery, gq.BridgeID, key).Scan(&gen.Value); err != nil {
		return unwedge.Generation{}, fmt.Errorf("failed to move the crypto generation on: %w", err)
	}
	return gen, nil
}
