package fault

import (
	"go/build/constraint"
	"os"
	"strings"
	"testing"
)

// TestTag: Tag is the tag that compiles on.go in and off.go out, so what the test harness builds
// with it has fault points.
func TestTag(t *testing.T) {
	cases := []struct {
		file   string
		withIt bool
	}{{"on.go", true}, {"off.go", false}}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			data, err := os.ReadFile(tc.file)
			if err != nil {
				t.Fatal(err)
			}
			line, _, _ := strings.Cut(string(data), "\n")
			expr, err := constraint.Parse(line)
			if err != nil {
				t.Fatalf("%s has no build constraint on its first line: %v", tc.file, err)
			}
			for _, tagged := range []bool{true, false} {
				built := expr.Eval(func(tag string) bool { return tagged && tag == Tag })
				if want := tagged == tc.withIt; built != want {
					t.Errorf("%s (%s) is built with the tag %v: %v, want %v", tc.file, line, tagged, built, want)
				}
			}
		})
	}
}
