package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/bridgev2/bridgeconfig"
	"maunium.net/go/mautrix/bridgev2/matrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
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

// memberHomeserver answers what Deliver asks the homeserver about an event that waited for its
// key: its sender is joined, the event is not redacted, and the bot posted no notice after it.
func memberHomeserver(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch path := r.URL.Path; {
		case strings.Contains(path, "/state/m.room.member/"):
			_, _ = w.Write([]byte(`{"membership":"join"}`))
		case strings.Contains(path, "/event/"):
			_, _ = w.Write([]byte(`{"type":"m.room.encrypted","event_id":"$e","room_id":"!portal:example.org","sender":"@alice:example.org",
				"content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"abc","session_id":"s","sender_key":"k","device_id":"PHONE"}}`))
		case strings.Contains(path, "/context/"):
			_, _ = w.Write([]byte(`{"events_after":[]}`))
		default:
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"errcode":"M_UNRECOGNIZED"}`))
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestDeliverVerificationLevel: an event that became decryptable late passes the check bridgev2
// applies to the events it decrypts itself (matrix.Connector.postDecrypt): below
// encryption.verification_levels.send, the level mautrix-go's config sets for incoming Matrix
// messages, it is dropped and never reaches the portal; at or above it, it is bridged (security
// finding 1, and security finding 21: no test held this check).
func TestDeliverVerificationLevel(t *testing.T) {
	cases := []struct {
		name          string
		send, receive id.TrustState
		trust         id.TrustState
		bridged       bool
	}{
		{"unverified, tofu required", id.TrustStateCrossSignedTOFU, id.TrustStateUnset, id.TrustStateUnset, false},
		{"cross-signed untrusted, tofu required", id.TrustStateCrossSignedTOFU, id.TrustStateUnset, id.TrustStateCrossSignedUntrusted, false},
		{"tofu, tofu required", id.TrustStateCrossSignedTOFU, id.TrustStateUnset, id.TrustStateCrossSignedTOFU, true},
		{"verified, tofu required", id.TrustStateCrossSignedTOFU, id.TrustStateUnset, id.TrustStateVerified, true},
		{"unverified, default", id.TrustStateUnset, id.TrustStateUnset, id.TrustStateUnset, true},
		{"forwarded key, default", id.TrustStateUnset, id.TrustStateUnset, id.TrustStateForwarded, true},
		{"device key mismatch, default", id.TrustStateUnset, id.TrustStateUnset, id.TrustStateDeviceKeyMismatch, false},
		{"blacklisted, default", id.TrustStateUnset, id.TrustStateUnset, id.TrustStateBlacklisted, false},
		// receive is the level the bridge shares its own room keys at, not a rule for incoming events.
		{"unverified, receive verified", id.TrustStateUnset, id.TrustStateVerified, id.TrustStateUnset, true},
	}
	srv := memberHomeserver(t)
	client, err := mautrix.NewClient(srv.URL, testBot, "token")
	if err != nil {
		t.Fatal(err)
	}
	br, _ := newTestBridge(t, "test", cryptotest.Database(t))
	// Every event was sent 90 s before its hand-over: the bridged ones are in the recovered-delay
	// histogram, the dropped ones are not.
	metrics := newMetrics(&Helper{})
	sent := time.Now().Add(-90 * time.Second)
	bridged := 0
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var dispatched []id.EventID
			processor := appservice.NewEventProcessor(nil)
			processor.ExecMode, processor.ExecSyncWarnTime, processor.ExecSyncTimeout = appservice.Sync, 0, 0
			processor.On(event.EventMessage, func(_ context.Context, evt *event.Event) { dispatched = append(dispatched, evt.ID) })
			cfg := &bridgeconfig.Config{}
			cfg.Encryption.VerificationLevels.Send, cfg.Encryption.VerificationLevels.Receive = tc.send, tc.receive
			sink := &recoverySink{h: &Helper{conn: &matrix.Connector{
				Config: cfg, Bot: &appservice.IntentAPI{Client: client}, Bridge: br, EventProcessor: processor,
			}, metrics: metrics}}

			eventID := id.EventID(fmt.Sprintf("$late%d", i))
			original := &event.Event{ID: eventID, RoomID: cmdPortal, Sender: cmdAlice, Type: event.EventEncrypted,
				Timestamp: sent.UnixMilli(), Content: event.Content{Raw: map[string]any{}}}
			decrypted := &event.Event{ID: eventID, RoomID: cmdPortal, Sender: cmdAlice, Type: event.EventMessage,
				Content: event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: "hello"}},
				Mautrix: event.MautrixInfo{TrustState: tc.trust}}
			err := sink.Deliver(t.Context(), original, decrypted, 1)

			var dropped *unwedge.DroppedError
			if tc.bridged {
				bridged++
				if err != nil || len(dispatched) != 1 || dispatched[0] != eventID {
					t.Errorf("trust %s with send %s: Deliver = %v, dispatched %v; want it bridged", tc.trust, tc.send, err, dispatched)
				}
			} else if !errors.As(err, &dropped) || !strings.Contains(dropped.Reason, "verification level") || len(dispatched) != 0 {
				t.Errorf("trust %s with send %s: Deliver = %v, dispatched %v; want it dropped for its verification level", tc.trust, tc.send, err, dispatched)
			}
		})
	}
	text := writeMetrics(metrics)
	for _, want := range []string{
		`unwedge_recovered_event_delay_seconds_bucket{le="60"} 0`,
		fmt.Sprintf(`unwedge_recovered_event_delay_seconds_bucket{le="120"} %d`, bridged),
		fmt.Sprintf(`unwedge_recovered_event_delay_seconds_count %d`, bridged),
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, text)
		}
	}
}
