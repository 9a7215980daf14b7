package bridge

import (
	"encoding/json"
	"testing"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// parseEvent parses an event as an appservice transaction does (content parsed by type).
func parseEvent(t *testing.T, raw string) *event.Event {
	t.Helper()
	var evt event.Event
	if err := json.Unmarshal([]byte(raw), &evt); err != nil {
		t.Fatal(err)
	}
	evt.Type.Class = event.MessageEventType
	if err := evt.Content.ParseRaw(evt.Type); err != nil {
		t.Fatal(err)
	}
	return &evt
}

// A redaction names its target at the top level (room versions up to 10) or in its content
// (room version 11); both are found, the parsed content too and the raw one.
func TestRedactsID(t *testing.T) {
	const target = id.EventID("$target")
	for name, raw := range map[string]string{
		"top-level": `{"type":"m.room.redaction","event_id":"$r","room_id":"!r:x","sender":"@a:x","redacts":"$target","content":{}}`,
		"content":   `{"type":"m.room.redaction","event_id":"$r","room_id":"!r:x","sender":"@a:x","content":{"redacts":"$target"}}`,
		"both":      `{"type":"m.room.redaction","event_id":"$r","room_id":"!r:x","sender":"@a:x","redacts":"$target","content":{"redacts":"$target"}}`,
	} {
		if got := redactsID(parseEvent(t, raw)); got != target {
			t.Errorf("%s: redacts %q, want %q", name, got, target)
		}
	}
	unparsed := &event.Event{Type: event.EventRedaction, Content: event.Content{VeryRaw: json.RawMessage(`{"redacts":"$target"}`)}}
	if got := redactsID(unparsed); got != target {
		t.Errorf("unparsed content: redacts %q, want %q", got, target)
	}
	if got := redactsID(parseEvent(t, `{"type":"m.room.redaction","event_id":"$r","content":{}}`)); got != "" {
		t.Errorf("no target: redacts %q", got)
	}
}

// The homeserver serves a redacted event with unsigned.redacted_because, and a redacted encrypted
// event without content.
func TestRedacted(t *testing.T) {
	for raw, want := range map[string]bool{
		`{"type":"m.room.encrypted","event_id":"$e","content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"abc","session_id":"s"}}`:                    false,
		`{"type":"m.room.encrypted","event_id":"$e","content":{},"unsigned":{"redacted_because":{"type":"m.room.redaction","event_id":"$r","content":{}}}}`: true,
		`{"type":"m.room.encrypted","event_id":"$e","content":{}}`:                                                                                          true,
	} {
		var evt event.Event
		if err := json.Unmarshal([]byte(raw), &evt); err != nil {
			t.Fatal(err)
		}
		if got := redacted(&evt); got != want {
			t.Errorf("redacted(%s) = %t, want %t", raw, got, want)
		}
	}
}
