package webhook

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/networkid"
	"maunium.net/go/mautrix/bridgev2/simplevent"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/webhook/store"
)

// APIPrefix is where the webhook API is served on the bridge's appservice listener.
const APIPrefix = "/_webhook/v1"

// CreateChatRequest is the body of POST /_webhook/v1/chats.
type CreateChatRequest struct {
	ChatID string `json:"chat_id"`
	Name   string `json:"name"`
}

// CreateChatResponse answers POST /_webhook/v1/chats.
type CreateChatResponse struct {
	ChatID  string    `json:"chat_id"`
	RoomID  id.RoomID `json:"room_id"`
	Created bool      `json:"created"`
}

// PostMessageRequest is the body of POST /_webhook/v1/messages.
type PostMessageRequest struct {
	ChatID string `json:"chat_id"`
	// Sender is the remote user ID of the author; a ghost user represents them in Matrix. Each
	// login has its own senders: another login's "bob" is another ghost (see GhostID).
	Sender     string `json:"sender"`
	SenderName string `json:"sender_name,omitempty"`
	// ID makes the post idempotent: a message ID that was bridged already is not bridged again.
	ID   string `json:"id,omitempty"`
	Text string `json:"text"`
}

// PostMessageResponse answers POST /_webhook/v1/messages.
type PostMessageResponse struct {
	MessageID string `json:"message_id"`
}

// OutboxResponse answers GET /_webhook/v1/outbox.
type OutboxResponse struct {
	Messages  []*store.OutboxMessage `json:"messages"`
	NextAfter int64                  `json:"next_after"`
}

// WhoamiResponse answers GET /_webhook/v1/whoami.
type WhoamiResponse struct {
	LoginID    string    `json:"login_id"`
	UserID     id.UserID `json:"user_id"`
	WebhookURL string    `json:"webhook_url,omitempty"`
}

// ErrCodeNotReady is the errcode of the 503 answer while the bridge is starting. Nothing was
// done, so the request can be sent again after the Retry-After header's seconds.
const ErrCodeNotReady = "M_NOT_READY"

// APIError is the body of every non-2xx answer.
type APIError struct {
	ErrCode string `json:"errcode"`
	Err     string `json:"error"`
}

func (c *Connector) registerAPI(router *http.ServeMux) {
	router.HandleFunc("POST "+APIPrefix+"/chats", c.authenticated(c.postChat))
	router.HandleFunc("POST "+APIPrefix+"/messages", c.authenticated(c.postMessage))
	router.HandleFunc("GET "+APIPrefix+"/outbox", c.authenticated(c.getOutbox))
	router.HandleFunc("GET "+APIPrefix+"/whoami", c.authenticated(c.getWhoami))
}

type apiHandler func(w http.ResponseWriter, r *http.Request, login *bridgev2.UserLogin)

func (c *Connector) authenticated(handler apiHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !c.started.Load() {
			// Nothing was done: the client can send the same request again.
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, ErrCodeNotReady, "the bridge is starting")
			return
		}
		log := c.br.Log.With().Str("component", "webhook api").Str("path", r.URL.Path).Logger()
		r = r.WithContext(log.WithContext(r.Context()))
		token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || token == "" {
			writeError(w, http.StatusUnauthorized, "M_MISSING_TOKEN", "missing Authorization: Bearer token")
			return
		}
		login, err := c.loginByToken(r.Context(), token)
		if err != nil {
			log.Err(err).Msg("Failed to authenticate webhook request")
			writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "failed to check token")
			return
		} else if login == nil {
			writeError(w, http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "unknown token")
			return
		}
		r = r.WithContext(login.Log.WithContext(r.Context()))
		handler(w, r, login)
	}
}

func (c *Connector) postChat(w http.ResponseWriter, r *http.Request, login *bridgev2.UserLogin) {
	var req CreateChatRequest
	if !c.readJSON(w, r, &req) {
		return
	}
	if !idPattern.MatchString(req.ChatID) {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "chat_id must be 1-64 lowercase letters, digits and ._=-")
		return
	} else if !utf8.ValidString(req.Name) || len(req.Name) > 255 {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "name must be valid UTF-8 of at most 255 bytes")
		return
	}
	if req.Name == "" {
		req.Name = req.ChatID
	}
	ctx := r.Context()
	portal, err := c.chatPortal(ctx, login, req.ChatID)
	var limitErr *limitError
	if errors.As(err, &limitErr) {
		writeError(w, http.StatusForbidden, ErrCodeLimitExceeded, limitErr.Error())
		return
	} else if err != nil {
		zerolog.Ctx(ctx).Err(err).Str("chat_id", req.ChatID).Msg("Failed to get portal")
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "failed to get portal")
		return
	}
	created := portal.MXID == ""
	if created {
		portal.Metadata.(*PortalMetadata).Name = req.Name
		if err = portal.CreateMatrixRoom(ctx, login, chatInfo(req.Name)); err != nil {
			zerolog.Ctx(ctx).Err(err).Str("chat_id", req.ChatID).Msg("Failed to create portal room")
			writeError(w, http.StatusBadGateway, "M_UNKNOWN", "failed to create Matrix room")
			return
		}
	}
	writeJSON(w, http.StatusOK, &CreateChatResponse{ChatID: req.ChatID, RoomID: portal.MXID, Created: created})
}

func (c *Connector) postMessage(w http.ResponseWriter, r *http.Request, login *bridgev2.UserLogin) {
	var req PostMessageRequest
	if !c.readJSON(w, r, &req) {
		return
	}
	if msg := validateMessage(&req, c.Config.MaxTextBytes); msg != "" {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", msg)
		return
	}
	ctx := r.Context()
	if len(c.br.Matrix.FormatGhostMXID(GhostID(login.ID, req.Sender))) > id.UserIDMaxLength {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "sender is too long: with the login ID its Matrix user ID would exceed 255 bytes")
		return
	}
	key := portalKey(login, req.ChatID)
	portal, err := c.br.GetExistingPortalByKey(ctx, key)
	if err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to get portal")
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "failed to get portal")
		return
	} else if portal == nil || portal.MXID == "" {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "unknown chat: create it with POST "+APIPrefix+"/chats")
		return
	}
	if req.ID == "" {
		req.ID = randomMessageID()
	}
	ghost, err := c.senderGhost(ctx, login, req.Sender)
	var limitErr *limitError
	if errors.As(err, &limitErr) {
		writeError(w, http.StatusForbidden, ErrCodeLimitExceeded, limitErr.Error())
		return
	} else if err != nil {
		zerolog.Ctx(ctx).Err(err).Str("sender", req.Sender).Msg("Failed to get ghost")
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "failed to prepare sender")
		return
	}
	name := req.SenderName
	if name == "" {
		name = req.Sender
	}
	ghost.UpdateInfo(ctx, &bridgev2.UserInfo{Name: &name})
	res := login.QueueRemoteEvent(&simplevent.Message[string]{
		EventMeta: simplevent.EventMeta{
			Type:      bridgev2.RemoteEventMessage,
			PortalKey: key,
			Sender:    bridgev2.EventSender{Sender: ghost.ID},
			Timestamp: time.Now(),
			LogContext: func(c zerolog.Context) zerolog.Context {
				return c.Str("chat_id", req.ChatID).Str("message_id", req.ID)
			},
		},
		ID:                 networkid.MessageID(req.ID),
		Data:               req.Text,
		ConvertMessageFunc: convertText,
	})
	if !res.Success && !res.Queued && !res.Ignored {
		zerolog.Ctx(ctx).Err(res.Error).Str("chat_id", req.ChatID).Msg("Failed to queue remote message")
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "failed to bridge message")
		return
	}
	writeJSON(w, http.StatusAccepted, &PostMessageResponse{MessageID: req.ID})
}

func validateMessage(req *PostMessageRequest, maxText int) string {
	switch {
	case !idPattern.MatchString(req.ChatID):
		return "chat_id must be 1-64 lowercase letters, digits and ._=-"
	case !idPattern.MatchString(req.Sender):
		return "sender must be 1-64 lowercase letters, digits and ._=-"
	case req.ID != "" && !idPattern.MatchString(req.ID):
		return "id must be 1-64 lowercase letters, digits and ._=-"
	case req.Text == "":
		return "text is required"
	case len(req.Text) > maxText:
		return fmt.Sprintf("text is longer than %d bytes", maxText)
	case !utf8.ValidString(req.Text) || !utf8.ValidString(req.SenderName):
		return "text and sender_name must be valid UTF-8"
	case len(req.SenderName) > 255:
		return "sender_name is longer than 255 bytes"
	}
	return ""
}

func convertText(ctx context.Context, portal *bridgev2.Portal, intent bridgev2.MatrixAPI, text string) (*bridgev2.ConvertedMessage, error) {
	return &bridgev2.ConvertedMessage{Parts: []*bridgev2.ConvertedMessagePart{{
		Type:    event.EventMessage,
		Content: &event.MessageEventContent{MsgType: event.MsgText, Body: text},
	}}}, nil
}

const maxOutboxPage = 500

func (c *Connector) getOutbox(w http.ResponseWriter, r *http.Request, login *bridgev2.UserLogin) {
	after, err := queryInt(r, "after", 0)
	if err != nil || after < 0 {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "after must be a non-negative integer")
		return
	}
	limit, err := queryInt(r, "limit", 100)
	if err != nil || limit < 1 || limit > maxOutboxPage {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", fmt.Sprintf("limit must be between 1 and %d", maxOutboxPage))
		return
	}
	msgs, err := c.db.Outbox.List(r.Context(), string(login.ID), after, int(limit))
	if err != nil {
		zerolog.Ctx(r.Context()).Err(err).Msg("Failed to list outbox")
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "failed to list outbox")
		return
	}
	resp := &OutboxResponse{Messages: msgs, NextAfter: after}
	if len(msgs) > 0 {
		resp.NextAfter = msgs[len(msgs)-1].ID
	}
	writeJSON(w, http.StatusOK, resp)
}

func (c *Connector) getWhoami(w http.ResponseWriter, r *http.Request, login *bridgev2.UserLogin) {
	writeJSON(w, http.StatusOK, &WhoamiResponse{
		LoginID:    string(login.ID),
		UserID:     login.UserMXID,
		WebhookURL: login.Metadata.(*LoginMetadata).WebhookURL,
	})
}

func queryInt(r *http.Request, name string, def int64) (int64, error) {
	raw := r.URL.Query().Get(name)
	if raw == "" {
		return def, nil
	}
	return strconv.ParseInt(raw, 10, 64)
}

// readJSON decodes a size-limited JSON body strictly, answering 400/413/415 itself on failure.
func (c *Connector) readJSON(w http.ResponseWriter, r *http.Request, into any) bool {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		writeError(w, http.StatusUnsupportedMediaType, "M_BAD_JSON", "Content-Type must be application/json")
		return false
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, c.Config.MaxBodyBytes))
	dec.DisallowUnknownFields()
	err := dec.Decode(into)
	if err == nil && dec.More() {
		err = errors.New("trailing data after JSON object")
	}
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "M_TOO_LARGE", fmt.Sprintf("body larger than %d bytes", tooLarge.Limit))
	case err != nil:
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "invalid JSON body: "+err.Error())
	default:
		return true
	}
	return false
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, &APIError{ErrCode: code, Err: msg})
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

func randomMessageID() string {
	buf := make([]byte, 8)
	_, _ = rand.Read(buf)
	return "wh-" + hex.EncodeToString(buf)
}
