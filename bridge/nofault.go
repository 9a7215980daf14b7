//go:build !unwedgefault

package bridge

import (
	"github.com/rs/zerolog"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// The product build has no fault points to arm: these do nothing, and the compiler drops their
// calls. fault.go is the test build's (build tag unwedgefault).

func armHealFaults(zerolog.Logger, *unwedge.Unwedger) error { return nil }

func armRecoveryFaults(zerolog.Logger, *unwedge.Recovery) error { return nil }
