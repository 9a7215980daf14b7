package webhook

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"unicode/utf8"
)

// FuzzPostMessageBody sends the webhook API's message endpoint arbitrary bodies: a body is either
// refused with 400, 413 or 415 and a JSON error, or it decodes to a message that passes every rule
// (or is refused by validateMessage with a reason). Nothing panics.
func FuzzPostMessageBody(f *testing.F) {
	c := &Connector{Config: Config{MaxBodyBytes: 8192, MaxTextBytes: 1024}}
	f.Add([]byte(`{"chat_id":"general","sender":"bob","text":"hi"}`), "application/json")
	f.Add([]byte(`{"chat_id":"general","sender":"bob","sender_name":"Bob","text":"hi","id":"m1"}`), "")
	f.Add([]byte(`{"chat_id":"general","sender":"bob","text":"hi","extra":1}`), "application/json")
	f.Add([]byte(`{"chat_id":"A B","sender":"","text":""}`), "application/json")
	f.Add([]byte(`{"chat_id":"general","sender":"bob","text":"hi"} {}`), "application/json")
	f.Add([]byte(`{"chat_id":"general","sender":"bob","text":"\xff"}`), "application/json")
	f.Add([]byte(`[1,2,3]`), "text/plain")
	f.Add(bytes.Repeat([]byte("a"), 9000), "application/json")
	f.Fuzz(func(t *testing.T, body []byte, contentType string) {
		r := httptest.NewRequest(http.MethodPost, APIPrefix+"/messages", bytes.NewReader(body))
		if contentType != "" {
			r.Header.Set("Content-Type", contentType)
		}
		w := httptest.NewRecorder()
		var req PostMessageRequest
		if !c.readJSON(w, r, &req) {
			if w.Code != http.StatusBadRequest && w.Code != http.StatusRequestEntityTooLarge && w.Code != http.StatusUnsupportedMediaType {
				t.Fatalf("refused with HTTP %d", w.Code)
			}
			var apiErr APIError
			if err := json.Unmarshal(w.Body.Bytes(), &apiErr); err != nil || apiErr.ErrCode == "" || apiErr.Err == "" {
				t.Fatalf("refusal is not a JSON error: %q (%v)", w.Body.String(), err)
			}
			return
		}
		if msg := validateMessage(&req, c.Config.MaxTextBytes); msg != "" {
			return
		}
		switch {
		case !idPattern.MatchString(req.ChatID), !idPattern.MatchString(req.Sender), req.ID != "" && !idPattern.MatchString(req.ID):
			t.Fatalf("accepted bad IDs: %+v", req)
		case req.Text == "", len(req.Text) > c.Config.MaxTextBytes, !utf8.ValidString(req.Text), !utf8.ValidString(req.SenderName), len(req.SenderName) > 255:
			t.Fatalf("accepted a bad text or sender name: %+v", req)
		}
	})
}
