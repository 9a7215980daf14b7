// Package envfile reads the KEY=VALUE files that scripts/stack.sh writes for Go code.
package envfile

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

// Read parses KEY=VALUE lines (no quoting). Blank lines and lines starting with # are skipped.
func Read(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	vals := make(map[string]string)
	scanner := bufio.NewScanner(f)
	for lineNo := 1; scanner.Scan(); lineNo++ {
		line := strings.TrimSpace(scanner.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s:%d: expected KEY=VALUE", path, lineNo)
		}
		vals[strings.TrimSpace(key)] = strings.TrimSpace(val)
	}
	if err = scanner.Err(); err != nil {
		return nil, fmt.Errorf("failed to read %s: %w", path, err)
	}
	return vals, nil
}
