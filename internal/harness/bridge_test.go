package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestModuleRoot(t *testing.T) {
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err = os.Stat(filepath.Join(root, "scripts", "stack.sh")); err != nil {
		t.Errorf("ModuleRoot() = %s, which has no scripts/stack.sh: %v", root, err)
	}
	// A go.mod of another module on the way up is skipped.
	sub := filepath.Join(t.TempDir(), "other")
	if err = os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err = os.WriteFile(filepath.Join(sub, "go.mod"), []byte("module example.com/other\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Chdir(sub)
	if _, err = ModuleRoot(); err == nil || !strings.Contains(err.Error(), "no go.mod") {
		t.Errorf("ModuleRoot() outside the repository: error = %v, want \"no go.mod\"", err)
	}
}
