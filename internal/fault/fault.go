// Package fault marks the points in unwedge where a test may kill or hold the bridge: where a
// crash or an outage would hurt most (between creating a replacement Olm session and sending
// m.dummy over it, between a late key's arrival and the event being bridged).
//
// Fault points exist only in builds with the build tag Tag. Without it, At is an empty function
// that the compiler inlines to nothing: the product binary (build.sh) holds no fault point, no
// hook and no name of one. With it, At calls the Hook that With put in the context; the bridge's
// test build arms it from the environment (package inject), and only the test harness builds
// that binary.
package fault

import "context"

// Tag is the build tag that compiles fault points in (go build -tags goolm,unwedgefault).
const Tag = "unwedgefault"

// Hook runs at a fault point, in the context of the work that reached it. It may block (to hold
// the process there) or never return (to kill it).
type Hook func(ctx context.Context, point string)
