//go:build !unwedgefault

package fault

import "context"

// At marks a fault point. Without the unwedgefault tag it does nothing and compiles to nothing.
func At(context.Context, string) {}
