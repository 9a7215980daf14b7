package unwedge_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// TestOneHealEngine: every heal goes through one engine. In the package's product code there is
// one call that encrypts a heal's m.dummy, one that asks the ledger for heals and one that records
// how they ended, all in heal.go; a second copy of any of them is where the copies used to differ.
func TestOneHealEngine(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	sites := map[string][]string{}
	for _, file := range files {
		if strings.HasSuffix(file, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, file, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			var what string
			switch name := sel.Sel.Name; {
			case (name == "EncryptToDevices" || name == "SendEncryptedToDevice") && sendsDummy(call):
				what = "m.dummy"
			case (name == "Acquire" || name == "Finish") && isLedger(sel.X):
				what = "ledger." + name
			default:
				return true
			}
			sites[what] = append(sites[what], fset.Position(call.Pos()).String())
			return true
		})
	}
	for _, what := range []string{"m.dummy", "ledger.Acquire", "ledger.Finish"} {
		if got := sites[what]; len(got) != 1 || !strings.HasPrefix(got[0], "heal.go:") {
			t.Errorf("%s is called at %v, want once, in heal.go", what, got)
		}
	}
}

// sendsDummy reports whether one of the call's arguments is event.ToDeviceDummy.
func sendsDummy(call *ast.CallExpr) bool {
	for _, arg := range call.Args {
		if sel, ok := arg.(*ast.SelectorExpr); ok && sel.Sel.Name == "ToDeviceDummy" {
			return true
		}
	}
	return false
}

// isLedger reports whether x is a ledger: u.ledger or ledger.
func isLedger(x ast.Expr) bool {
	switch x := x.(type) {
	case *ast.SelectorExpr:
		return x.Sel.Name == "ledger"
	case *ast.Ident:
		return x.Name == "ledger"
	}
	return false
}
