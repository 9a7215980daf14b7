//go:build unwedgefault

package fault

import "context"

type hookKey struct{}

// With returns a context whose fault points (At) call hook.
func With(ctx context.Context, hook Hook) context.Context {
	return context.WithValue(ctx, hookKey{}, hook)
}

// At marks a fault point: it calls the Hook of ctx (With), if any, with the point's name.
func At(ctx context.Context, point string) {
	if hook, ok := ctx.Value(hookKey{}).(Hook); ok && hook != nil {
		hook(ctx, point)
	}
}
