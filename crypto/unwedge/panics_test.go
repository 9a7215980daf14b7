package unwedge_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"slices"
	"testing"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// TestPanicSites: PanicSites, which the metrics show from the start, lists every PanicSite
// constant declared, once.
func TestPanicSites(t *testing.T) {
	file, err := parser.ParseFile(token.NewFileSet(), "panics.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var declared []unwedge.PanicSite
	ast.Inspect(file, func(n ast.Node) bool {
		spec, ok := n.(*ast.ValueSpec)
		if !ok {
			return true
		}
		if typ, ok := spec.Type.(*ast.Ident); !ok || typ.Name != "PanicSite" {
			return true
		}
		for _, value := range spec.Values {
			if lit, ok := value.(*ast.BasicLit); ok {
				declared = append(declared, unwedge.PanicSite(lit.Value[1:len(lit.Value)-1]))
			}
		}
		return true
	})
	listed := unwedge.PanicSites()
	slices.Sort(declared)
	sorted := slices.Sorted(slices.Values(listed))
	if len(declared) == 0 || !slices.Equal(declared, sorted) || len(slices.Compact(slices.Clone(sorted))) != len(listed) {
		t.Errorf("PanicSites() lists %v, the file declares %v", sorted, declared)
	}
}
