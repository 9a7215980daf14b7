//go:build unwedgefault

package bridge

import (
	"os"

	"github.com/rs/zerolog"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/fault"
	"github.com/unwedge/unwedge/internal/fault/inject"
)

// This file exists only in the test build of the bridge (build tag unwedgefault), which the test
// harness builds for the fault tests: they crash or hold the bridge where a fault would hurt most
// (inject.EnvVar). nofault.go is the product's: it arms nothing.

// armHealFaults arms the fault points of u's heals as inject.EnvVar says, if it is set.
func armHealFaults(log zerolog.Logger, u *unwedge.Unwedger) error {
	hook, err := faultHook(log)
	if hook != nil {
		u.ArmFaults(hook)
	}
	return err
}

// armRecoveryFaults arms the fault points of recovery as inject.EnvVar says, if it is set.
func armRecoveryFaults(log zerolog.Logger, r *unwedge.Recovery) error {
	hook, err := faultHook(log)
	if hook != nil {
		r.ArmFaults(hook)
	}
	return err
}

// faultHook is the hook inject.EnvVar asks for; nil when it is not set.
func faultHook(log zerolog.Logger) (fault.Hook, error) {
	spec := os.Getenv(inject.EnvVar)
	if spec == "" {
		return nil, nil
	}
	s, err := inject.Parse(spec)
	if err != nil {
		return nil, err
	}
	log.Warn().Str("point", s.Point).Str("hold", s.Hold).Msg("Fault injection armed")
	return s.Hook(log), nil
}
