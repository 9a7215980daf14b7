package webhook_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/lib/pq"
	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	_ "go.mau.fi/util/dbutil/litestream"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/bridgeconfig"
	"maunium.net/go/mautrix/bridgev2/commands"
	bridgedb "maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"
	"maunium.net/go/mautrix/bridgev2/status"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/webhook"
)

// This file runs the webhook network in a real bridgev2.Bridge, on a real database (SQLite, and
// Postgres when the test stack runs), with the Matrix side replaced by fakeMatrix, which records
// what the bridge did in Matrix: rooms, display names, messages and who sent them.

// forEachDatabase runs test on a fresh SQLite file, and on a fresh Postgres database of the test
// stack (skipped without it, failed with UNWEDGE_REQUIRE_STACK=1).
func forEachDatabase(t *testing.T, test func(t *testing.T, dialect, uri string)) {
	t.Run("sqlite", func(t *testing.T) {
		test(t, "sqlite3-fk-wal", "file:"+filepath.Join(t.TempDir(), "bridge.db")+"?_txlock=immediate")
	})
	t.Run("postgres", func(t *testing.T) {
		test(t, "postgres", testenv.Require(t).NewDatabase(t))
	})
}

// testConfig is the example config's network section with the given limits.
func testConfig(chats, senders int) webhook.Config {
	return webhook.Config{
		MaxBodyBytes: 65536, MaxTextBytes: 16384, MaxChatsPerLogin: chats, MaxSendersPerLogin: senders,
		Delivery: webhook.DeliveryConfig{Timeout: time.Second, MaxAttempts: 1, MinBackoff: time.Second, MaxBackoff: time.Second},
	}
}

// testBridge is a started bridge with the webhook network, its API served over HTTP.
type testBridge struct {
	br     *bridgev2.Bridge
	conn   *webhook.Connector
	matrix *fakeMatrix
	api    *httptest.Server
	stop   func()
}

// startBridge starts a bridge on the database; stop it and start another on the same database
// for a restart.
func startBridge(t *testing.T, dialect, uri string, cfg webhook.Config) *testBridge {
	t.Helper()
	raw, err := dbutil.NewWithDialect(uri, dialect)
	if err != nil {
		t.Fatalf("open %s: %v", dialect, err)
	}
	tb := &testBridge{conn: &webhook.Connector{Config: cfg}, matrix: newFakeMatrix()}
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel)
	tb.br = bridgev2.NewBridge("test-bridge", raw, log, &bridgeconfig.BridgeConfig{CommandPrefix: "!wh"},
		tb.matrix, tb.conn, func(br *bridgev2.Bridge) bridgev2.CommandProcessor { return commands.NewProcessor(br) })
	if err = tb.br.StartConnectors(context.Background()); err != nil {
		t.Fatalf("start bridge: %v", err)
	}
	tb.api = httptest.NewServer(tb.matrix.router)
	tb.stop = sync.OnceFunc(func() {
		tb.api.Close()
		tb.br.StopWithTimeout(5 * time.Second)
	})
	t.Cleanup(tb.stop)
	return tb
}

// login logs a Matrix user in with the webhook login flow and returns the API client of the login.
func (tb *testBridge) login(t *testing.T, userID id.UserID, account string) *webhook.RemoteClient {
	t.Helper()
	ctx := context.Background()
	user, err := tb.br.GetUserByMXID(ctx, userID)
	if err != nil {
		t.Fatal(err)
	}
	process, err := tb.conn.CreateLogin(ctx, user, "webhook")
	if err != nil {
		t.Fatal(err)
	}
	step, err := process.(bridgev2.LoginProcessUserInput).SubmitUserInput(ctx, map[string]string{"account": account, "webhook_url": "none"})
	if err != nil {
		t.Fatalf("log in %s: %v", account, err)
	}
	token, ok := webhook.TokenFromInstructions(step.Instructions)
	if !ok {
		t.Fatalf("no token in %q", step.Instructions)
	}
	return webhook.NewRemoteClient(tb.api.URL, token)
}

// sentMessage is a message the bridge sent into a Matrix room.
type sentMessage struct {
	room   id.RoomID
	sender id.UserID
	body   string
}

// fakeMatrix is the Matrix side of a test bridge: a bridgev2.MatrixConnector whose intents succeed
// and record what they did.
type fakeMatrix struct {
	router *http.ServeMux
	// idPrefix makes the room and event IDs of this fake unique, also across restarts.
	idPrefix string

	lock         sync.Mutex
	rooms        int
	displayNames map[id.UserID]string
	messages     []sentMessage
}

var _ bridgev2.MatrixConnectorWithServer = (*fakeMatrix)(nil)

func newFakeMatrix() *fakeMatrix {
	return &fakeMatrix{router: http.NewServeMux(), idPrefix: rand.Text(), displayNames: make(map[id.UserID]string)}
}

const fakeDomain = "test.invalid"

var errFake = errors.New("not supported by the fake Matrix connector")

// displayName is the last display name the ghost was given.
func (m *fakeMatrix) displayName(userID id.UserID) string {
	m.lock.Lock()
	defer m.lock.Unlock()
	return m.displayNames[userID]
}

// sent returns the messages sent so far.
func (m *fakeMatrix) sent() []sentMessage {
	m.lock.Lock()
	defer m.lock.Unlock()
	return append([]sentMessage(nil), m.messages...)
}

func (m *fakeMatrix) Init(*bridgev2.Bridge)       {}
func (m *fakeMatrix) Start(context.Context) error { return nil }
func (m *fakeMatrix) PreStop()                    {}
func (m *fakeMatrix) Stop()                       {}
func (m *fakeMatrix) GetRouter() *http.ServeMux   { return m.router }
func (m *fakeMatrix) GetPublicAddress() string    { return "" }
func (m *fakeMatrix) ServerName() string          { return fakeDomain }
func (m *fakeMatrix) GetCapabilities() *bridgev2.MatrixCapabilities {
	return &bridgev2.MatrixCapabilities{}
}

func (m *fakeMatrix) ParseGhostMXID(userID id.UserID) (networkid.UserID, bool) {
	localpart, domain, err := userID.Parse()
	encoded, ok := strings.CutPrefix(localpart, "webhook_")
	if err != nil || domain != fakeDomain || !ok {
		return "", false
	}
	decoded, err := id.DecodeUserLocalpart(encoded)
	return networkid.UserID(decoded), err == nil
}

func (m *fakeMatrix) FormatGhostMXID(userID networkid.UserID) id.UserID {
	return id.NewUserID("webhook_"+id.EncodeUserLocalpart(string(userID)), fakeDomain)
}

func (m *fakeMatrix) GhostIntent(userID networkid.UserID) bridgev2.MatrixAPI {
	return &fakeIntent{m: m, mxid: m.FormatGhostMXID(userID)}
}

func (m *fakeMatrix) BotIntent() bridgev2.MatrixAPI {
	return &fakeIntent{m: m, mxid: id.NewUserID("webhookbot", fakeDomain)}
}

func (m *fakeMatrix) NewUserIntent(ctx context.Context, userID id.UserID, accessToken string) (bridgev2.MatrixAPI, string, error) {
	return nil, accessToken, nil
}

func (m *fakeMatrix) SendBridgeStatus(context.Context, *status.BridgeState) error { return nil }
func (m *fakeMatrix) SendMessageStatus(context.Context, *bridgev2.MessageStatus, *bridgev2.MessageStatusEventInfo) {
}

func (m *fakeMatrix) GenerateContentURI(context.Context, networkid.MediaID) (id.ContentURIString, error) {
	return "", errFake
}

func (m *fakeMatrix) ParseContentURI(context.Context, id.ContentURIString) (networkid.MediaID, error) {
	return nil, errFake
}

func (m *fakeMatrix) GetPowerLevels(context.Context, id.RoomID) (*event.PowerLevelsEventContent, error) {
	return &event.PowerLevelsEventContent{}, nil
}

func (m *fakeMatrix) GetMembers(context.Context, id.RoomID) (map[id.UserID]*event.MemberEventContent, error) {
	return map[id.UserID]*event.MemberEventContent{}, nil
}

func (m *fakeMatrix) GetMemberInfo(context.Context, id.RoomID, id.UserID) (*event.MemberEventContent, error) {
	return nil, nil
}

func (m *fakeMatrix) BatchSend(context.Context, id.RoomID, *mautrix.ReqBeeperBatchSend, []*bridgev2.MatrixSendExtra) (*mautrix.RespBeeperBatchSend, error) {
	return nil, errFake
}

func (m *fakeMatrix) GenerateDeterministicRoomID(networkid.PortalKey) id.RoomID { return "" }

func (m *fakeMatrix) GenerateDeterministicEventID(id.RoomID, networkid.PortalKey, networkid.MessageID, networkid.PartID) id.EventID {
	return ""
}

func (m *fakeMatrix) GenerateReactionEventID(id.RoomID, *bridgedb.Message, networkid.UserID, networkid.EmojiID) id.EventID {
	return ""
}

// fakeIntent is a Matrix user of fakeMatrix: the bridge bot or a ghost.
type fakeIntent struct {
	m    *fakeMatrix
	mxid id.UserID
}

var _ bridgev2.MatrixAPI = (*fakeIntent)(nil)

func (fi *fakeIntent) GetMXID() id.UserID   { return fi.mxid }
func (fi *fakeIntent) IsDoublePuppet() bool { return false }

func (fi *fakeIntent) SendMessage(ctx context.Context, roomID id.RoomID, eventType event.Type, content *event.Content, extra *bridgev2.MatrixSendExtra) (*mautrix.RespSendEvent, error) {
	fi.m.lock.Lock()
	defer fi.m.lock.Unlock()
	msg := sentMessage{room: roomID, sender: fi.mxid}
	if parsed, ok := content.Parsed.(*event.MessageEventContent); ok {
		msg.body = parsed.Body
	}
	fi.m.messages = append(fi.m.messages, msg)
	return &mautrix.RespSendEvent{EventID: id.EventID(fmt.Sprintf("$%s-%d", fi.m.idPrefix, len(fi.m.messages)))}, nil
}

func (fi *fakeIntent) SendState(ctx context.Context, roomID id.RoomID, eventType event.Type, stateKey string, content *event.Content, ts time.Time) (*mautrix.RespSendEvent, error) {
	return &mautrix.RespSendEvent{EventID: "$state"}, nil
}

func (fi *fakeIntent) MarkRead(context.Context, id.RoomID, id.EventID, time.Time) error { return nil }
func (fi *fakeIntent) MarkUnread(context.Context, id.RoomID, bool) error                { return nil }
func (fi *fakeIntent) MarkTyping(context.Context, id.RoomID, bridgev2.TypingType, time.Duration) error {
	return nil
}

func (fi *fakeIntent) DownloadMedia(context.Context, id.ContentURIString, *event.EncryptedFileInfo) ([]byte, error) {
	return nil, errFake
}

func (fi *fakeIntent) DownloadMediaToFile(context.Context, id.ContentURIString, *event.EncryptedFileInfo, bool, func(*os.File) error) error {
	return errFake
}

func (fi *fakeIntent) UploadMedia(context.Context, id.RoomID, []byte, string, string) (id.ContentURIString, *event.EncryptedFileInfo, error) {
	return "", nil, errFake
}

func (fi *fakeIntent) UploadMediaStream(context.Context, id.RoomID, int64, bool, bridgev2.FileStreamCallback) (id.ContentURIString, *event.EncryptedFileInfo, error) {
	return "", nil, errFake
}

func (fi *fakeIntent) SetDisplayName(ctx context.Context, name string) error {
	fi.m.lock.Lock()
	defer fi.m.lock.Unlock()
	fi.m.displayNames[fi.mxid] = name
	return nil
}

func (fi *fakeIntent) SetAvatarURL(context.Context, id.ContentURIString) error { return nil }
func (fi *fakeIntent) SetExtraProfileMeta(context.Context, any) error          { return nil }
func (fi *fakeIntent) SetProfile(context.Context, any) error                   { return nil }

func (fi *fakeIntent) CreateRoom(ctx context.Context, req *mautrix.ReqCreateRoom) (id.RoomID, error) {
	fi.m.lock.Lock()
	defer fi.m.lock.Unlock()
	fi.m.rooms++
	return id.RoomID(fmt.Sprintf("!%s-%d:%s", fi.m.idPrefix, fi.m.rooms, fakeDomain)), nil
}

func (fi *fakeIntent) DeleteRoom(context.Context, id.RoomID, bool) error { return nil }
func (fi *fakeIntent) EnsureJoined(context.Context, id.RoomID, ...bridgev2.EnsureJoinedParams) error {
	return nil
}
func (fi *fakeIntent) EnsureInvited(context.Context, id.RoomID, id.UserID) error { return nil }
func (fi *fakeIntent) TagRoom(context.Context, id.RoomID, event.RoomTag, bool) error {
	return nil
}
func (fi *fakeIntent) MuteRoom(context.Context, id.RoomID, time.Time) error { return nil }

func (fi *fakeIntent) GetEvent(context.Context, id.RoomID, id.EventID) (*event.Event, error) {
	return nil, errFake
}
