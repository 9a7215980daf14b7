// Package inject is what a test build of the bridge does at a fault point (package fault), as the
// environment variable EnvVar says: kill itself with SIGKILL, or hold until a file exists.
//
// Only files built with the unwedgefault tag import it, so no product binary holds any of it.
// It builds without the tag so that its tests run in every test run.
package inject

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/unwedge/unwedge/internal/fault"
)

// EnvVar names the environment variable that arms a fault point of a test build of the bridge
// (unwedge.FaultSessionCreated, unwedge.FaultKeyArrived...):
//
//	UNWEDGE_TEST_FAULT=<point>               the bridge kills itself with SIGKILL there
//	UNWEDGE_TEST_FAULT=<point>:hold=<file>   the first time, it waits there until <file> exists
//
// Holding lets a test stop the homeserver or the database at exactly that point.
const EnvVar = "UNWEDGE_TEST_FAULT"

// holdPoll is how often a held point looks for its file.
const holdPoll = 50 * time.Millisecond

// Spec is a parsed EnvVar value.
type Spec struct {
	Point string
	// Hold is the file to wait for; empty means kill.
	Hold string
}

// Parse parses an EnvVar value.
func Parse(spec string) (Spec, error) {
	point, action, hasAction := strings.Cut(spec, ":")
	if point == "" {
		return Spec{}, fmt.Errorf("%s=%q: no fault point", EnvVar, spec)
	}
	s := Spec{Point: point}
	if hasAction {
		file, ok := strings.CutPrefix(action, "hold=")
		if !ok || file == "" {
			return Spec{}, fmt.Errorf("%s=%q: the action after the point must be hold=<file>", EnvVar, spec)
		}
		s.Hold = file
	}
	return s, nil
}

// Hook is the fault.Hook that does what s says at s.Point and nothing at other points. A hold
// holds only the first time, and ends early when the context of the work that reached the point
// is done.
func (s Spec) Hook(log zerolog.Logger) fault.Hook {
	var once sync.Once
	return func(ctx context.Context, point string) {
		if point != s.Point {
			return
		}
		if s.Hold == "" {
			log.Warn().Str("point", point).Msg("Fault injection: killing the bridge")
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			return
		}
		once.Do(func() {
			log.Warn().Str("point", point).Str("until", s.Hold).Msg("Fault injection: holding until the file exists")
			for ctx.Err() == nil {
				if _, err := os.Stat(s.Hold); err == nil {
					break
				}
				select {
				case <-ctx.Done():
				case <-time.After(holdPoll):
				}
			}
			log.Warn().Str("point", point).Msg("Fault injection: going on")
		})
	}
}
