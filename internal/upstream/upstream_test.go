package upstream

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// TestPinned fails when go.mod requires another mautrix-go than Version, or when a pinned file
// is not the one unwedge was checked against: then read the file's diff against Version, check
// what Relies says, bring the named unwedge code along, and update the table.
func TestPinned(t *testing.T) {
	version, dir, err := Locate()
	if err != nil {
		t.Fatal(err)
	}
	if version != Version {
		t.Errorf("go.mod requires mautrix-go %s, and the table in internal/upstream pins %s: check each file below against %s's, then set Version", version, Version, version)
	}
	for _, f := range Files {
		t.Run(f.Path, func(t *testing.T) {
			if problem := check(dir, f); problem != "" {
				t.Errorf("%s of mautrix-go %s %s (pinned in %s). %s relies on: %s. Diff it against %s's, check that, and update the table",
					f.Path, version, problem, Version, f.Users, f.Relies, Version)
			}
		})
	}
}

// check returns what is wrong with the pinned file in dir, or "".
func check(dir string, f File) string {
	data, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(f.Path)))
	if err != nil {
		return "cannot be read (" + err.Error() + ")"
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != f.SHA256 {
		return "changed: sha256 " + got + ", not " + f.SHA256
	}
	return ""
}

// TestPinnedCanFail: a changed file, and a file that is gone, are both reported.
func TestPinnedCanFail(t *testing.T) {
	_, dir, err := Locate()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range Files {
		changed := f
		changed.SHA256 = "0" + f.SHA256[1:]
		if f.SHA256[0] == '0' {
			changed.SHA256 = "1" + f.SHA256[1:]
		}
		if check(dir, changed) == "" {
			t.Errorf("%s: a wrong hash is not reported", f.Path)
		}
	}
	if check(dir, File{Path: "crypto/no-such-file.go"}) == "" {
		t.Error("a missing file is not reported")
	}
}

// TestTableComplete: every entry says who relies on it and on what, once per path.
func TestTableComplete(t *testing.T) {
	seen := make(map[string]bool)
	for _, f := range Files {
		if f.Path == "" || len(f.SHA256) != 64 || f.Users == "" || f.Relies == "" {
			t.Errorf("incomplete entry %+v", f)
		}
		if seen[f.Path] {
			t.Errorf("%s pinned twice", f.Path)
		}
		seen[f.Path] = true
	}
}
