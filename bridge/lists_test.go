package bridge

import (
	"bytes"
	"go/ast"
	"go/build"
	"go/parser"
	"go/token"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The lists the docs keep by hand (files, tables, classes, log fields, interfaces) are checked
// against what the code and the schema hold, both ways: nothing missing, nothing that is gone.

// goFile is one parsed non-test Go file of a package directory.
type goFile struct {
	name string
	ast  *ast.File
	// product: the file is in the product build (-tags goolm), not only in a test build
	// (unwedgefault).
	product bool
}

// parseDir parses the non-test Go files of dir, with their comments.
func parseDir(t *testing.T, dir string) []goFile {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	product := build.Default
	product.BuildTags = []string{"goolm"}
	var files []goFile
	for _, entry := range entries {
		name := entry.Name()
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), filepath.Join(dir, name), nil, parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		match, err := product.MatchFile(dir, name)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, goFile{name: name, ast: f, product: match})
	}
	if len(files) == 0 {
		t.Fatalf("no Go files in %s", dir)
	}
	return files
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// sortedSet returns the set's members in order.
func sortedSet(set map[string]bool) []string {
	return slices.Sorted(maps.Keys(set))
}

// compareSets reports what one side has and the other lacks.
func compareSets(t *testing.T, what, codeSide string, code map[string]bool, docSide string, doc map[string]bool) {
	t.Helper()
	var missing, extra []string
	for name := range code {
		if !doc[name] {
			missing = append(missing, name)
		}
	}
	for name := range doc {
		if !code[name] {
			extra = append(extra, name)
		}
	}
	slices.Sort(missing)
	slices.Sort(extra)
	if len(missing) > 0 {
		t.Errorf("%s: %s has %v, which %s lacks", what, codeSide, missing, docSide)
	}
	if len(extra) > 0 {
		t.Errorf("%s: %s names %v, which %s does not have", what, docSide, extra, codeSide)
	}
}

// codeNames are the `code` names in the first column of a markdown table's rows ("| `a`, `b` |").
func codeNames(table string) map[string]bool {
	names := map[string]bool{}
	row := regexp.MustCompile("(?m)^\\| ((?:`[a-z0-9_.]+`(?:, )?)+) \\|")
	for _, m := range row.FindAllStringSubmatch(table, -1) {
		for _, name := range regexp.MustCompile("`([a-z0-9_.]+)`").FindAllStringSubmatch(m[1], -1) {
			names[name[1]] = true
		}
	}
	return names
}

// The package comment of crypto/unwedge names each of its files (a file a step; fault.go, which
// only the test build has, too), and every file a package comment names exists.
func TestDocFileLists(t *testing.T) {
	for _, pkg := range []struct {
		dir string
		// complete: the comment must name every file (bridge's names none, and need not).
		complete bool
	}{{"../crypto/unwedge", true}, {"../bridge", false}} {
		t.Run(filepath.Base(pkg.dir), func(t *testing.T) {
			files := parseDir(t, pkg.dir)
			have := map[string]bool{}
			var doc string
			for _, f := range files {
				have[f.name] = true
				if f.ast.Doc != nil {
					doc += f.ast.Doc.Text()
				}
			}
			named := map[string]bool{}
			for _, m := range regexp.MustCompile(`\b([a-z0-9_]+\.go)\b`).FindAllStringSubmatch(doc, -1) {
				named[m[1]] = true
			}
			for name := range named {
				if !have[name] {
					t.Errorf("the package comment names %s, which %s does not have", name, pkg.dir)
				}
			}
			if !pkg.complete && len(named) == 0 {
				return
			}
			if len(named) < 5 {
				t.Fatalf("the package comment names only %v", sortedSet(named))
			}
			for name := range have {
				if name != "doc.go" && !named[name] {
					t.Errorf("%s/%s is not named in the package comment (doc.go)", pkg.dir, name)
				}
			}
		})
	}
}

// unwedgeTables returns the tables that database/upgrades creates (and does not drop again), and
// the version table database.go gives dbutil.
func unwedgeTables(t *testing.T) map[string]bool {
	t.Helper()
	paths, err := filepath.Glob("../database/upgrades/unwedge/*.sql")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no upgrade files: %v", err)
	}
	slices.Sort(paths)
	create := regexp.MustCompile(`(?i)\bCREATE TABLE (?:IF NOT EXISTS )?(\w+)`)
	drop := regexp.MustCompile(`(?i)\bDROP TABLE (?:IF EXISTS )?(\w+)`)
	tables, latest := map[string]bool{}, map[string]bool{}
	for _, path := range paths {
		sql := readFile(t, path)
		for _, m := range create.FindAllStringSubmatch(sql, -1) {
			tables[m[1]] = true
			if filepath.Base(path) == "00-latest.sql" {
				latest[m[1]] = true
			}
		}
		for _, m := range drop.FindAllStringSubmatch(sql, -1) {
			delete(tables, m[1])
		}
	}
	compareSets(t, "tables", "the upgrade steps", tables, "00-latest.sql", latest)
	version := regexp.MustCompile(`\.Child\("(\w+)"`).FindStringSubmatch(readFile(t, "../database/database.go"))
	if version == nil {
		t.Fatal("database.go names no version table (parent.Child)")
	}
	tables[version[1]] = true
	if len(tables) < 5 {
		t.Fatalf("only %d tables: %v", len(tables), sortedSet(tables))
	}
	return tables
}

// servedMetrics returns the metric families the metrics endpoint serves.
func servedMetrics() map[string]bool {
	served := map[string]bool{}
	for name := range servedFamilies() {
		served[name] = true
	}
	return served
}

// metricFamily is what the metrics endpoint serves of one family: its type, and the values that
// each label of its series takes.
type metricFamily struct {
	kind   string
	labels map[string]map[string]bool
}

// servedFamilies returns the families the metrics endpoint serves with no Unwedger, recovery or
// database behind it: every family, its labelled series with zeros (write makes them appear so
// that dashboards and alerts do not see series vanish). unwedge_olm_failures_total has no series
// then: its classes are those the detector found.
func servedFamilies() map[string]*metricFamily {
	families := map[string]*metricFamily{}
	var current *metricFamily
	label := regexp.MustCompile(`([a-z_]+)="([^"]*)"`)
	for _, line := range strings.Split(writeMetrics(newMetrics(&Helper{})), "\n") {
		fields := strings.Fields(line)
		switch {
		case len(fields) == 4 && fields[1] == "TYPE":
			current = &metricFamily{kind: fields[3], labels: map[string]map[string]bool{}}
			families[fields[2]] = current
		case len(fields) > 0 && fields[0] != "#" && current != nil:
			for _, m := range label.FindAllStringSubmatch(line, -1) {
				if current.labels[m[1]] == nil {
					current.labels[m[1]] = map[string]bool{}
				}
				current.labels[m[1]][m[2]] = true
			}
		}
	}
	return families
}

// The admin guide's table list, the database package's comment and the README name exactly the
// tables the schema has.
func TestGuideTables(t *testing.T) {
	tables := unwedgeTables(t)
	compareSets(t, "tables", "database/upgrades", tables, "the admin guide's Install table",
		codeNames(section(t, readGuide(t), "## Install")))

	tableName := regexp.MustCompile(`\bunwedge_[a-z_]+\b`)
	named := map[string]bool{}
	for _, name := range tableName.FindAllString(packageComment(t, "../database/database.go"), -1) {
		named[name] = true
	}
	compareSets(t, "tables", "database/upgrades", tables, "database.go's package comment", named)

	// The README names metrics nowhere now; were it to, they are not tables.
	served := servedMetrics()
	named = map[string]bool{}
	for _, name := range tableName.FindAllString(readFile(t, "../README.md"), -1) {
		if !served[name] {
			named[name] = true
		}
	}
	compareSets(t, "tables", "database/upgrades", tables, "README.md", named)
}

// unwedgeInterfaces returns crypto/unwedge's exported interfaces with their methods' names,
// embedded interfaces of the package included.
func unwedgeInterfaces(t *testing.T) map[string][]string {
	t.Helper()
	decls := map[string]*ast.InterfaceType{}
	for _, f := range parseDir(t, "../crypto/unwedge") {
		ast.Inspect(f.ast, func(n ast.Node) bool {
			if spec, ok := n.(*ast.TypeSpec); ok {
				if iface, ok := spec.Type.(*ast.InterfaceType); ok {
					decls[spec.Name.Name] = iface
				}
			}
			return true
		})
	}
	var methods func(name string) []string
	methods = func(name string) []string {
		var out []string
		for _, field := range decls[name].Methods.List {
			if len(field.Names) > 0 {
				out = append(out, field.Names[0].Name)
			} else if embedded, ok := field.Type.(*ast.Ident); ok && decls[embedded.Name] != nil {
				out = append(out, methods(embedded.Name)...)
			}
		}
		return out
	}
	out := map[string][]string{}
	for name := range decls {
		if ast.IsExported(name) {
			out[name] = methods(name)
		}
	}
	return out
}

// databaseImplements returns the crypto/unwedge interfaces that a type of package database has
// every method of (by name: the compiler checks the signatures where the bridge passes them).
func databaseImplements(t *testing.T) map[string]bool {
	t.Helper()
	methods := map[string]map[string]bool{}
	for _, f := range parseDir(t, "../database") {
		for _, decl := range f.ast.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if !ok || fn.Recv == nil || len(fn.Recv.List) == 0 {
				continue
			}
			recv := fn.Recv.List[0].Type
			if star, ok := recv.(*ast.StarExpr); ok {
				recv = star.X
			}
			if ident, ok := recv.(*ast.Ident); ok {
				if methods[ident.Name] == nil {
					methods[ident.Name] = map[string]bool{}
				}
				methods[ident.Name][fn.Name.Name] = true
			}
		}
	}
	implemented := map[string]bool{}
	for iface, want := range unwedgeInterfaces(t) {
		for _, have := range methods {
			if len(want) > 0 && !slices.ContainsFunc(want, func(m string) bool { return !have[m] }) {
				implemented[iface] = true
			}
		}
	}
	if len(implemented) < 3 {
		t.Fatalf("package database implements only %v", sortedSet(implemented))
	}
	return implemented
}

// packageComment returns the text of a file's package comment.
func packageComment(t *testing.T, path string) string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	if f.Doc == nil {
		t.Fatalf("%s has no package comment", path)
	}
	return f.Doc.Text()
}

// listedNames splits "A, B and C" (names in backticks or not) into its names.
func listedNames(list string) map[string]bool {
	names := map[string]bool{}
	for _, name := range regexp.MustCompile(`[A-Z][A-Za-z]+`).FindAllString(list, -1) {
		names[name] = true
	}
	return names
}

// The database package's comment, crypto/unwedge's and the README name exactly the interfaces of
// crypto/unwedge that package database implements.
func TestDocDatabaseInterfaces(t *testing.T) {
	implemented := databaseImplements(t)
	for _, doc := range []struct{ where, text, pattern string }{
		{"database.go's package comment", packageComment(t, "../database/database.go"), `implements\s+crypto/unwedge's\s+([^.]+)\.`},
		{"crypto/unwedge/doc.go", packageComment(t, "../crypto/unwedge/doc.go"), `The\s+database\s+package\s+implements\s+([^.]+?)\s+on\s+Postgres`},
		{"README.md", readFile(t, "../README.md"), "implements `crypto/unwedge`'s ([^|]+)\\|"},
	} {
		m := regexp.MustCompile(doc.pattern).FindStringSubmatch(doc.text)
		if m == nil {
			t.Errorf("%s does not say which interfaces package database implements (%s)", doc.where, doc.pattern)
			continue
		}
		compareSets(t, "interfaces", "package database", implemented, doc.where, listedNames(m[1]))
	}
}

// unwedgeClasses returns the values of crypto/unwedge's Class constants.
func unwedgeClasses(t *testing.T) map[string]bool {
	t.Helper()
	classes := map[string]bool{}
	for _, f := range parseDir(t, "../crypto/unwedge") {
		for _, decl := range f.ast.Decls {
			gen, ok := decl.(*ast.GenDecl)
			if !ok || gen.Tok != token.CONST {
				continue
			}
			for _, spec := range gen.Specs {
				vs := spec.(*ast.ValueSpec)
				if typ, ok := vs.Type.(*ast.Ident); !ok || typ.Name != "Class" {
					continue
				}
				for _, value := range vs.Values {
					lit, ok := value.(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						t.Fatalf("a Class constant's value is no string literal: %T", value)
					}
					s, _ := strconv.Unquote(lit.Value)
					classes[s] = true
				}
			}
		}
	}
	if len(classes) < 10 {
		t.Fatalf("only %d classes: %v", len(classes), sortedSet(classes))
	}
	return classes
}

// The admin guide's class table lists every Class of crypto/unwedge, and nothing else.
func TestGuideClasses(t *testing.T) {
	metrics := section(t, readGuide(t), "## Metrics")
	header := "| class | a wedge? | what happened |"
	start := strings.Index(metrics, header)
	if start < 0 {
		t.Fatalf("the Metrics section has no class table (%q)", header)
	}
	table := metrics[start:]
	if end := strings.Index(table, "\n\n"); end >= 0 {
		table = table[:end]
	}
	compareSets(t, "classes", "crypto/unwedge", unwedgeClasses(t), "the admin guide's class table", codeNames(table))
}

// fieldMethods are zerolog's methods that add a field named by their first argument.
var fieldMethods = map[string]bool{
	"Str": true, "Strs": true, "Stringer": true, "Stringers": true, "Int": true, "Int8": true, "Int16": true, "Int32": true,
	"Int64": true, "Ints": true, "Uint": true, "Uint8": true, "Uint16": true, "Uint32": true, "Uint64": true, "Float32": true,
	"Float64": true, "Bool": true, "Bools": true, "Dur": true, "Durs": true, "Time": true, "Times": true, "TimeDiff": true,
	"Any": true, "Interface": true, "AnErr": true, "Errs": true, "Bytes": true, "Hex": true, "RawJSON": true, "IPAddr": true,
	"Dict": true, "Array": true, "Object": true, "EmbedObject": false, "Type": true,
}

// logFields returns the fields that the zerolog calls in the files write: a field method's first
// argument (a string literal, or zerolog's ErrorFieldName and ErrorStackFieldName), and "error"
// for Err. A field named any other way fails the test, so that none escapes the check.
func logFields(t *testing.T, files []goFile) map[string]bool {
	t.Helper()
	fields := map[string]bool{}
	for _, f := range files {
		selectorCalls(f.ast, func(call *ast.CallExpr, sel *ast.SelectorExpr) {
			switch {
			case sel.Sel.Name == "Err" && len(call.Args) == 1:
				fields["error"] = true
			case fieldMethods[sel.Sel.Name] && len(call.Args) == 2:
				switch key := call.Args[0].(type) {
				case *ast.BasicLit:
					name, err := strconv.Unquote(key.Value)
					if err != nil {
						t.Errorf("%s: a field name that is no string: %s", f.name, key.Value)
					}
					fields[name] = true
				case *ast.SelectorExpr:
					switch key.Sel.Name {
					case "ErrorFieldName":
						fields["error"] = true
					case "ErrorStackFieldName":
						fields["stack"] = true
					default:
						t.Errorf("%s: %s(%s.%s, ...): name the field with a literal, or teach this test the constant", f.name, sel.Sel.Name, key.X, key.Sel.Name)
					}
				default:
					t.Errorf("%s: %s with a computed field name: name the field with a literal", f.name, sel.Sel.Name)
				}
			}
		})
	}
	return fields
}

// selectorCalls calls fn for every call of a selector (x.Name(...)) in the file.
func selectorCalls(file *ast.File, fn func(call *ast.CallExpr, sel *ast.SelectorExpr)) {
	ast.Inspect(file, func(n ast.Node) bool {
		if call, ok := n.(*ast.CallExpr); ok {
			if sel, ok := call.Fun.(*ast.SelectorExpr); ok {
				fn(call, sel)
			}
		}
		return true
	})
}

// TestOneHealEngine: every heal goes through one engine. In crypto/unwedge's product code there
// is one call that encrypts a heal's m.dummy, one that asks the ledger for heals and one that
// records how they ended, all in heal.go; a second copy of any of them is where the copies used
// to differ.
func TestOneHealEngine(t *testing.T) {
	sites := map[string][]string{}
	for _, f := range parseDir(t, "../crypto/unwedge") {
		selectorCalls(f.ast, func(call *ast.CallExpr, sel *ast.SelectorExpr) {
			var what string
			switch name := sel.Sel.Name; {
			case (name == "EncryptToDevices" || name == "SendEncryptedToDevice") && slices.ContainsFunc(call.Args, isDummy):
				what = "m.dummy"
			case (name == "Acquire" || name == "Finish") && isLedger(sel.X):
				what = "ledger." + name
			default:
				return
			}
			sites[what] = append(sites[what], f.name)
		})
	}
	for _, what := range []string{"m.dummy", "ledger.Acquire", "ledger.Finish"} {
		if got := sites[what]; len(got) != 1 || got[0] != "heal.go" {
			t.Errorf("%s is called in %v, want once, in heal.go", what, got)
		}
	}
}

// isDummy reports whether an argument is event.ToDeviceDummy.
func isDummy(arg ast.Expr) bool {
	sel, ok := arg.(*ast.SelectorExpr)
	return ok && sel.Sel.Name == "ToDeviceDummy"
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

// The admin guide's log-field table has a row for every field the code of crypto/unwedge and
// bridge writes on a line, and no row for a field it does not write. Not counted: files only the
// test build has (unwedgefault's fault points), and in bridge/stock.go the fields that mautrix-go's
// bridgev2/matrix/crypto.go writes too, since stock.go mirrors it (its own lines carry
// mautrix-go's fields, as the stock helper's do; TestStockMirror holds the mirror to upstream).
// Every message the log section quotes is one the code logs.
func TestGuideLogFields(t *testing.T) {
	_, upstreamSource := stockCryptoSource(t)
	upstream, err := parser.ParseFile(token.NewFileSet(), "crypto.go", upstreamSource, 0)
	if err != nil {
		t.Fatal(err)
	}
	upstreamFields := logFields(t, []goFile{{name: "mautrix-go's crypto.go", ast: upstream}})

	code := map[string]bool{}
	var sources []byte
	for _, dir := range []string{"../crypto/unwedge", "../bridge"} {
		for _, f := range parseDir(t, dir) {
			sources = append(sources, readFile(t, filepath.Join(dir, f.name))...)
			if !f.product {
				continue
			}
			for field := range logFields(t, []goFile{f}) {
				if f.name == "stock.go" && filepath.Base(dir) == "bridge" && upstreamFields[field] {
					continue
				}
				code[field] = true
			}
		}
	}
	if len(code) < 30 {
		t.Fatalf("only %d log fields found: %v", len(code), sortedSet(code))
	}
	guide := readGuide(t)
	documented := codeNames(section(t, guide, "### Log fields"))
	compareSets(t, "log fields", "the code", code, "the admin guide's log-field table", documented)

	logs := section(t, guide, "## Reading a wedge in the logs")
	if end := strings.Index(logs, "mautrix-go's own lines around it"); end >= 0 {
		logs = logs[:end] // mautrix-go's messages follow
	}
	quoted := 0
	for _, m := range regexp.MustCompile("`([A-Z][^`\n]* [^`\n]*)`").FindAllStringSubmatch(logs, -1) {
		quoted++
		if !bytes.Contains(sources, []byte(`"`+m[1])) {
			t.Errorf("the log section quotes %q, which no line of crypto/unwedge or bridge starts with", m[1])
		}
	}
	if quoted < 20 {
		t.Fatalf("the log section quotes only %d messages", quoted)
	}
}
