package testclient

import (
	"errors"
	"slices"
	"testing"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

func TestHistory(t *testing.T) {
	const room = id.RoomID("!room:test")
	msg := func(eventID string, ts int64) *event.Event {
		return &event.Event{ID: id.EventID(eventID), RoomID: room, Type: event.EventMessage, Timestamp: ts}
	}
	enc := func(eventID string, ts int64) *event.Event {
		return &event.Event{ID: id.EventID(eventID), RoomID: room, Type: event.EventEncrypted, Timestamp: ts}
	}
	errNoKey := errors.New("no key")
	type step struct {
		decrypted   *event.Event // addDecrypted
		undecrypted *event.Event // addUndecryptable
	}
	cases := []struct {
		name              string
		steps             []step
		wantMessages      []id.EventID
		wantUndecryptable []id.EventID
	}{
		{
			name:         "messages ordered by timestamp",
			steps:        []step{{decrypted: msg("$b", 2)}, {decrypted: msg("$c", 3)}, {decrypted: msg("$a", 1)}},
			wantMessages: []id.EventID{"$a", "$b", "$c"},
		},
		{
			name:              "undecryptable kept once",
			steps:             []step{{undecrypted: enc("$a", 1)}, {undecrypted: enc("$a", 1)}, {undecrypted: enc("$b", 2)}},
			wantUndecryptable: []id.EventID{"$a", "$b"},
		},
		{
			name: "late decryption moves the event",
			steps: []step{
				{undecrypted: enc("$a", 1)}, {decrypted: msg("$b", 2)}, {undecrypted: enc("$c", 3)},
				{decrypted: msg("$a", 1)},
			},
			wantMessages:      []id.EventID{"$a", "$b"},
			wantUndecryptable: []id.EventID{"$c"},
		},
		{
			name:         "decrypted event is not undecryptable again, nor duplicated",
			steps:        []step{{decrypted: msg("$a", 1)}, {undecrypted: enc("$a", 1)}, {decrypted: msg("$a", 1)}},
			wantMessages: []id.EventID{"$a"},
		},
		{
			name:  "other decrypted event types only leave undecryptable",
			steps: []step{{undecrypted: enc("$r", 1)}, {decrypted: &event.Event{ID: "$r", RoomID: room, Type: event.EventReaction}}},
		},
	}
	ids := func(evts []*event.Event) []id.EventID {
		var out []id.EventID
		for _, evt := range evts {
			out = append(out, evt.ID)
		}
		return out
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &Client{hist: newHistory()}
			for _, s := range tc.steps {
				if s.decrypted != nil {
					c.hist.addDecrypted(s.decrypted)
				} else {
					c.hist.addUndecryptable(s.undecrypted, errNoKey)
				}
			}
			if got := ids(c.Messages(room)); !slices.Equal(got, tc.wantMessages) {
				t.Errorf("Messages = %v, want %v", got, tc.wantMessages)
			}
			if got := ids(c.Undecryptable(room)); !slices.Equal(got, tc.wantUndecryptable) {
				t.Errorf("Undecryptable = %v, want %v", got, tc.wantUndecryptable)
			}
			for _, evtID := range tc.wantUndecryptable {
				if !errors.Is(c.DecryptionError(evtID), errNoKey) {
					t.Errorf("DecryptionError(%s) = %v, want %v", evtID, c.DecryptionError(evtID), errNoKey)
				}
			}
			for _, evtID := range tc.wantMessages {
				if err := c.DecryptionError(evtID); err != nil {
					t.Errorf("DecryptionError(%s) = %v after decryption", evtID, err)
				}
			}
		})
	}
}
