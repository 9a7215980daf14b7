package bridge

// Version is unwedge's version. Releases are git tags "v" + Version (v0.1.0), so a bridge
// requires one with `go get github.com/unwedge/unwedge@v0.1.0`; CHANGELOG.md says what each has.
const Version = "0.1.0"
