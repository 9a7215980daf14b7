package bridge

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// FaultEnv names the environment variable that arms fault injection for tests, at one of the
// named points of a heal or of recovery (unwedge.FaultSessionCreated, unwedge.FaultKeyArrived...):
//
//	UNWEDGE_TEST_FAULT=<point>               the bridge kills itself with SIGKILL there
//	UNWEDGE_TEST_FAULT=<point>:hold=<file>   the first time, it waits there until <file> exists
//
// Holding lets a test stop the homeserver or the database at exactly that point.
const FaultEnv = "UNWEDGE_TEST_FAULT"

// fault is a parsed FaultEnv value.
type fault struct {
	point string
	hold  string // the file to wait for; empty means kill
	once  sync.Once
}

func parseFault(spec string) (*fault, error) {
	point, action, hasAction := strings.Cut(spec, ":")
	if point == "" {
		return nil, fmt.Errorf("%s=%q: no fault point", FaultEnv, spec)
	}
	f := &fault{point: point}
	if hasAction {
		file, ok := strings.CutPrefix(action, "hold=")
		if !ok || file == "" {
			return nil, fmt.Errorf("%s=%q: the action after the point must be hold=<file>", FaultEnv, spec)
		}
		f.hold = file
	}
	return f, nil
}

// hook is the FaultHook for the Unwedger and Recovery.
func (f *fault) hook(ctx context.Context, log zerolog.Logger) func(point string) {
	return func(at string) {
		if at != f.point {
			return
		}
		if f.hold == "" {
			log.Warn().Str("point", at).Msg("Fault injection: killing the bridge")
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			return
		}
		f.once.Do(func() {
			log.Warn().Str("point", at).Str("until", f.hold).Msg("Fault injection: holding until the file exists")
			for ctx.Err() == nil {
				if _, err := os.Stat(f.hold); err == nil {
					break
				}
				select {
				case <-ctx.Done():
				case <-time.After(50 * time.Millisecond):
				}
			}
			log.Warn().Str("point", at).Msg("Fault injection: going on")
		})
	}
}
