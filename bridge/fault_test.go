package bridge

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestParseFault(t *testing.T) {
	cases := []struct {
		spec, point, hold string
		ok                bool
	}{
		{"session_created", "session_created", "", true},
		{"key_arrived:hold=/tmp/go", "key_arrived", "/tmp/go", true},
		{"", "", "", false},
		{":hold=/tmp/go", "", "", false},
		{"key_arrived:hold=", "", "", false},
		{"key_arrived:pause", "", "", false},
	}
	for _, tc := range cases {
		f, err := parseFault(tc.spec)
		if (err == nil) != tc.ok {
			t.Errorf("parseFault(%q) error = %v, want ok=%v", tc.spec, err, tc.ok)
			continue
		}
		if tc.ok && (f.point != tc.point || f.hold != tc.hold) {
			t.Errorf("parseFault(%q) = point %q hold %q, want %q %q", tc.spec, f.point, f.hold, tc.point, tc.hold)
		}
	}
}

// TestFaultHold: a held point waits until the file exists, and only the first time; other points
// pass at once.
func TestFaultHold(t *testing.T) {
	file := filepath.Join(t.TempDir(), "release")
	f, err := parseFault("key_arrived:hold=" + file)
	if err != nil {
		t.Fatal(err)
	}
	hook := f.hook(context.Background(), zerolog.Nop())
	hook("session_created") // not the armed point: returns at once
	done := make(chan struct{})
	go func() {
		hook("key_arrived")
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
		hook("key_arrived")
		close(second)
	}()
	select {
	case <-second:
	case <-time.After(5 * time.Second):
		t.Fatal("the hook held a second time")
	}
}
