//go:build unwedgefault

package fault

import (
	"context"
	"slices"
	"testing"
)

func TestFaultAt(t *testing.T) {
	var reached []string
	hook := func(_ context.Context, point string) { reached = append(reached, point) }
	cases := []struct {
		name string
		ctx  context.Context
		want []string
	}{
		{"no hook", context.Background(), nil},
		{"nil hook", With(context.Background(), nil), nil},
		{"armed", With(context.Background(), hook), []string{"a", "b"}},
		{"armed, derived context", context.WithoutCancel(With(context.Background(), hook)), []string{"a", "b"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			reached = nil
			At(tc.ctx, "a")
			At(tc.ctx, "b")
			if !slices.Equal(reached, tc.want) {
				t.Errorf("reached %q, want %q", reached, tc.want)
			}
		})
	}
}
