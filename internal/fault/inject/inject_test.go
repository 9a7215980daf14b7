package inject

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestParse(t *testing.T) {
	cases := []struct {
		spec string
		want Spec
		ok   bool
	}{
		{"session_created", Spec{Point: "session_created"}, true},
		{"key_arrived:hold=/tmp/go", Spec{Point: "key_arrived", Hold: "/tmp/go"}, true},
		{"", Spec{}, false},
		{":hold=/tmp/go", Spec{}, false},
		{"key_arrived:hold=", Spec{}, false},
		{"key_arrived:pause", Spec{}, false},
	}
	for _, tc := range cases {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := Parse(tc.spec)
			if (err == nil) != tc.ok {
				t.Fatalf("Parse(%q) error = %v, want ok=%v", tc.spec, err, tc.ok)
			}
			if got != tc.want {
				t.Errorf("Parse(%q) = %+v, want %+v", tc.spec, got, tc.want)
			}
		})
	}
}

// TestHold: a held point waits until the file exists, and only the first time; other points
// pass at once.
func TestHold(t *testing.T) {
	file := filepath.Join(t.TempDir(), "release")
	s, err := Parse("key_arrived:hold=" + file)
	if err != nil {
		t.Fatal(err)
	}
	hook := s.Hook(zerolog.Nop())
	ctx := context.Background()
	hook(ctx, "session_created") // not the armed point: returns at once
	done := make(chan struct{})
	go func() {
		hook(ctx, "key_arrived")
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("the hook did not hold before the file existed")
	case <-time.After(200 * time.Millisecond):
	}
	if err = os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the hook still holds after the file was created")
	}
	if err = os.Remove(file); err != nil {
		t.Fatal(err)
	}
	second := make(chan struct{})
	go func() {
		hook(ctx, "key_arrived")
		close(second)
	}()
	select {
	case <-second:
	case <-time.After(5 * time.Second):
		t.Fatal("the hook held a second time")
	}
}

// TestHoldEndsWithContext: a hold ends when the work that reached the point is stopped, though
// the file never comes.
func TestHoldEndsWithContext(t *testing.T) {
	s, err := Parse("key_arrived:hold=" + filepath.Join(t.TempDir(), "never"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Hook(zerolog.Nop())(ctx, "key_arrived")
		close(done)
	}()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the hook still holds after its context ended")
	}
}
