// The ceiling of a native receiver that keeps triage-node's promise: a DCMTK (dcmnet) Storage
// SCP that answers Success only once the instance's file is fsynced, renamed into a
// study/series/instance tree whose directory entry is fsynced, and its study, series and
// instance rows are committed to SQLite (WAL, synchronous=FULL) -- what the node does before
// Success, without Python. Used by ingest.py ("dcmtk-durable") to show what a receive path
// that is not pynetdicom's could reach against Orthanc on the same machine; it is a
// benchmark peer, not a part of the node (no admission, TLS, settle or logging).
//
// With a third argument, a Unix socket where benchmarks/recorder.py listens, the rows are not
// written here: each worker sends the instance's header fields to the node's own Python
// `Intake.record_instance` (one request and its one-byte answer per instance) and answers
// Success once it is committed -- a native receive path in front of the node's database code.
//
//     g++ -O2 -std=c++17 durable_scp.cpp -o durable_scp -ldcmnet -ldcmdata -loflog -lofstd
//         -lsqlite3 -lpthread    (one line; Debian: libdcmtk-dev, libsqlite3-dev; ingest.py
//         builds it)
//     durable_scp PORT DIRECTORY [RECORDER_SOCKET]
//
// One worker thread per association (DcmSCPPool, up to 32), each with its own SQLite
// connection or recorder connection.
//
// With --adopt, it listens on no port: benchmarks/front.py accepts the connections, admits
// them with the node's admission code (dicom.admission) and passes each one, with one end of a
// socket pair, over CONTROL_SOCKET (SCM_RIGHTS). The association is taken over from the
// accepted socket (dcmExternalSocketHandle, as DCMTK's inetd mode) and served by a worker
// thread (AdoptedSCP) that asks the front, over its socket pair, whether to accept it (the
// node's AE title rules), tells it when it was accepted and how it ended (the node's
// association records), receives each instance into INCOMING_DIR behind a File Meta naming
// the node, and answers the status the front gives once it stored it with the node's
// StorageHandlers (checks, fsync, placement, rows): everything the node does except the DICOM
// transport. The A-ASSOCIATE-AC carries the node's Implementation Class UID and Version Name;
// an association idle for IDLE_SECONDS is ended.
//
// With --adopt-header, the worker also reads the instance's header fields (DCMTK, up to Pixel
// Data) and sends them along, so that the front does not parse the file again.
//
//     durable_scp --adopt|--adopt-header CONTROL_SOCKET INCOMING_DIR
//         [AE_TITLE IMPLEMENTATION_CLASS_UID VERSION_NAME IDLE_SECONDS]

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcfilefo.h>
#include <dcmtk/dcmdata/dcmetinf.h>
#include <dcmtk/dcmdata/dcostrmf.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/scppool.h>
#include <dcmtk/dcmnet/scpthrd.h>
#include <dcmtk/oflog/oflog.h>

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

std::string g_root;
std::string g_recorder;  // empty: rows written here
bool g_header = false;   // --adopt-header: the header fields read here go to the front
std::atomic<unsigned long> g_counter{0};

const char* SCHEMA =
    "CREATE TABLE IF NOT EXISTS studies (id INTEGER PRIMARY KEY, study_uid TEXT UNIQUE NOT NULL,"
    " accession_number TEXT, study_date TEXT, updated_at TEXT);"
    "CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, study_id INTEGER NOT NULL,"
    " series_uid TEXT UNIQUE NOT NULL, modality TEXT, body_part TEXT, description TEXT);"
    "CREATE TABLE IF NOT EXISTS instances (id INTEGER PRIMARY KEY,"
    " sop_instance_uid TEXT UNIQUE NOT NULL, study_id INTEGER NOT NULL, series_id INTEGER NOT NULL,"
    " sop_class_uid TEXT, transfer_syntax_uid TEXT, path TEXT, size_bytes INTEGER, received_at TEXT);";

bool fsync_path(const std::string& path, int flags) {
    int fd = open(path.c_str(), flags);
    if (fd < 0) return false;
    bool ok = fsync(fd) == 0;
    close(fd);
    return ok;
}

bool valid_uid(const std::string& uid) {
    if (uid.empty() || uid.size() > 64) return false;
    for (char c : uid)
        if (!(c == '.' || (c >= '0' && c <= '9'))) return false;
    return true;
}

// mkdir + fsync of the parent when the directory is new (as the node does for a new study).
bool make_dir(const std::string& parent, const std::string& path) {
    if (mkdir(path.c_str(), 0700) == 0) return fsync_path(parent, O_RDONLY | O_DIRECTORY);
    return errno == EEXIST;
}

// The header fields kept in the rows, as the node's InstanceHeader.
struct Header {
    OFString study, series, sop, sop_class, syntax, modality, body_part, description,
        accession, date;
};

// The header fields, read up to Pixel Data.
bool read_header(const std::string& part, Header& h) {
    DcmFileFormat file;
    if (file.loadFileUntilTag(part.c_str(), EXS_Unknown, EGL_noChange, DCM_MaxReadLength,
                              ERM_autoDetect, DCM_PixelData)
            .bad())
        return false;
    DcmDataset* data = file.getDataset();
    data->findAndGetOFString(DCM_StudyInstanceUID, h.study);
    data->findAndGetOFString(DCM_SeriesInstanceUID, h.series);
    data->findAndGetOFString(DCM_SOPInstanceUID, h.sop);
    data->findAndGetOFString(DCM_SOPClassUID, h.sop_class);
    data->findAndGetOFString(DCM_Modality, h.modality);
    data->findAndGetOFString(DCM_BodyPartExamined, h.body_part);
    data->findAndGetOFString(DCM_SeriesDescription, h.description);
    data->findAndGetOFString(DCM_AccessionNumber, h.accession);
    data->findAndGetOFString(DCM_StudyDate, h.date);
    file.getMetaInfo()->findAndGetOFString(DCM_TransferSyntaxUID, h.syntax);
    return true;
}

class DurableSCP : public DcmThreadSCP {
  public:
    DurableSCP() {
        if (!g_recorder.empty()) {
            recorder_ = socket(AF_UNIX, SOCK_STREAM, 0);
            sockaddr_un address{};
            address.sun_family = AF_UNIX;
            std::snprintf(address.sun_path, sizeof(address.sun_path), "%s", g_recorder.c_str());
            if (connect(recorder_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
                close(recorder_);  // no recorder: every store of this worker fails
                recorder_ = -1;
            }
            return;
        }
        std::string db = g_root + "/index.sqlite";
        if (sqlite3_open(db.c_str(), &db_) != SQLITE_OK) std::abort();
        sqlite3_busy_timeout(db_, 10000);
        sqlite3_exec(db_, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", nullptr, nullptr,
                     nullptr);
        prepare(&study_,
                "INSERT INTO studies (study_uid, accession_number, study_date, updated_at)"
                " VALUES (?1, ?2, ?3, datetime('now')) ON CONFLICT (study_uid) DO UPDATE"
                " SET updated_at = excluded.updated_at RETURNING id");
        prepare(&series_,
                "INSERT INTO series (study_id, series_uid, modality, body_part, description)"
                " VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (series_uid) DO UPDATE"
                " SET modality = excluded.modality RETURNING id");
        prepare(&instance_,
                "INSERT INTO instances (sop_instance_uid, study_id, series_id, sop_class_uid,"
                " transfer_syntax_uid, path, size_bytes, received_at)"
                " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, datetime('now'))"
                " ON CONFLICT (sop_instance_uid) DO UPDATE SET path = excluded.path,"
                " size_bytes = excluded.size_bytes RETURNING id");
    }
    ~DurableSCP() override {
        if (recorder_ >= 0) close(recorder_);
        sqlite3_finalize(study_);
        sqlite3_finalize(series_);
        sqlite3_finalize(instance_);
        sqlite3_close(db_);
    }

  protected:
    OFCondition handleIncomingCommand(T_DIMSE_Message* message,
                                      const DcmPresentationContextInfo& info) override {
        if (message->CommandField != DIMSE_C_STORE_RQ)
            return DcmThreadSCP::handleIncomingCommand(message, info);
        T_DIMSE_C_StoreRQ& request = message->msg.CStoreRQ;
        std::string part = g_root + "/incoming/" + std::to_string(getpid()) + "-" +
                           std::to_string(g_counter++) + ".part";
        OFCondition received = receiveSTORERequest(request, info.presentationContextID, part.c_str());
        if (received.bad()) {
            unlink(part.c_str());
            return received;
        }
        Uint16 status = store(part) ? STATUS_Success : STATUS_STORE_Refused_OutOfResources;
        if (status != STATUS_Success) unlink(part.c_str());
        return sendSTOREResponse(info.presentationContextID, request, status);
    }

  private:

    const bool remote_ = !g_recorder.empty();
    int recorder_ = -1;
    sqlite3* db_ = nullptr;
    sqlite3_stmt* study_ = nullptr;
    sqlite3_stmt* series_ = nullptr;
    sqlite3_stmt* instance_ = nullptr;

    void prepare(sqlite3_stmt** statement, const char* sql) {
        if (sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, statement, nullptr) !=
            SQLITE_OK) {
            std::fprintf(stderr, "%s\n", sqlite3_errmsg(db_));
            std::abort();
        }
    }

    long long step_id(sqlite3_stmt* statement) {
        long long id = -1;
        if (sqlite3_step(statement) == SQLITE_ROW) id = sqlite3_column_int64(statement, 0);
        while (sqlite3_step(statement) == SQLITE_ROW) {
        }
        sqlite3_reset(statement);
        sqlite3_clear_bindings(statement);
        return id;
    }

    static void bind(sqlite3_stmt* statement, int index, const OFString& text) {
        sqlite3_bind_text(statement, index, text.c_str(), -1, SQLITE_TRANSIENT);
    }

    // Fields NUL-separated after a 4-byte length; the recorder answers one byte, 0 = committed.
    bool record_remotely(const Header& h, const std::string& relpath, off_t size) {
        std::string message(4, '\0');
        for (const OFString& field :
             {h.study, h.series, h.sop, h.sop_class, h.syntax, h.modality, h.body_part,
              h.description, h.accession, h.date, OFString(relpath.c_str()),
              OFString(std::to_string(size).c_str())}) {
            message.append(field.c_str());
            message.push_back('\0');
        }
        uint32_t length = static_cast<uint32_t>(message.size() - 4);
        std::memcpy(&message[0], &length, 4);
        if (send(recorder_, message.data(), message.size(), MSG_NOSIGNAL) !=
            static_cast<ssize_t>(message.size()))
            return false;  // the recorder gone: a failure status, not SIGPIPE
        char answer = 1;
        return read(recorder_, &answer, 1) == 1 && answer == 0;
    }

    // Study, series and instance rows in one committed transaction.
    bool record_here(const Header& h, const std::string& relpath, off_t size) {
        if (sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) != SQLITE_OK)
            return false;
        bind(study_, 1, h.study);
        bind(study_, 2, h.accession);
        bind(study_, 3, h.date);
        long long study_id = step_id(study_);
        sqlite3_bind_int64(series_, 1, study_id);
        bind(series_, 2, h.series);
        bind(series_, 3, h.modality);
        bind(series_, 4, h.body_part);
        bind(series_, 5, h.description);
        long long series_id = step_id(series_);
        bind(instance_, 1, h.sop);
        sqlite3_bind_int64(instance_, 2, study_id);
        sqlite3_bind_int64(instance_, 3, series_id);
        bind(instance_, 4, h.sop_class);
        bind(instance_, 5, h.syntax);
        sqlite3_bind_text(instance_, 6, relpath.c_str(), -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(instance_, 7, static_cast<long long>(size));
        long long instance_id = step_id(instance_);
        bool ok = study_id >= 0 && series_id >= 0 && instance_id >= 0;
        return sqlite3_exec(db_, ok ? "COMMIT" : "ROLLBACK", nullptr, nullptr, nullptr) ==
                   SQLITE_OK &&
               ok;
    }

    // The file durable, then its header read, placed, and its rows committed; a row that is
    // not committed takes its file back, so nothing unrecorded stays placed.
    bool store(const std::string& part) {
        if (!fsync_path(part, O_RDONLY)) return false;
        Header h;
        if (!read_header(part, h)) return false;
        if (!valid_uid(h.study.c_str()) || !valid_uid(h.series.c_str()) ||
            !valid_uid(h.sop.c_str()))
            return false;
        std::string relpath = std::string(h.study.c_str()) + "/" + h.series.c_str() + "/" +
                              h.sop.c_str() + ".dcm";
        std::string study_dir = g_root + "/spool/" + h.study.c_str();
        std::string series_dir = study_dir + "/" + h.series.c_str();
        std::string target = g_root + "/spool/" + relpath;
        if (!make_dir(g_root + "/spool", study_dir) || !make_dir(study_dir, series_dir))
            return false;
        if (rename(part.c_str(), target.c_str()) != 0) return false;
        struct stat info {};
        bool recorded = fsync_path(series_dir, O_RDONLY | O_DIRECTORY) &&
                        stat(target.c_str(), &info) == 0 &&
                        (remote_ ? recorder_ >= 0 && record_remotely(h, relpath, info.st_size)
                                 : record_here(h, relpath, info.st_size));
        if (!recorded) unlink(target.c_str());
        return recorded;
    }
};

// The node's identity, announced in the A-ASSOCIATE-AC and written into the File Meta.
std::string g_implementation_uid = "1.2.276.0.7230010.3.0.3.6.7";  // DCMTK's until told
std::string g_implementation_version = "DURABLE_SCP";

// One message to the front: a type byte and NUL-terminated fields, after a 4-byte
// little-endian length. False when the front is gone.
bool send_message(int channel, char type, std::initializer_list<const char*> fields,
                  const std::vector<std::string>& more = {}) {
    std::string message(4, '\0');
    message.push_back(type);
    for (const char* field : fields) {
        message.append(field);
        message.push_back('\0');
    }
    for (const std::string& field : more) {
        message.append(field.c_str());  // up to an embedded NUL, as DICOM strings have none
        message.push_back('\0');
    }
    uint32_t length = static_cast<uint32_t>(message.size() - 4);
    std::memcpy(&message[0], &length, 4);
    return send(channel, message.data(), message.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(message.size());
}

// A worker serving one association taken over from the front (--adopt). The front decides and
// records, over this association's socket pair, in order:
//   'Q' calling AE, called AE, peer address -> 1 byte: 0 accept, 1 called AE not recognised,
//       2 calling AE not recognised (the association is refused with that reason)
//   'O' the association was accepted -> no answer (the front records it)
//   'S' received file, Affected SOP Class and Instance UIDs [, header fields] -> 2-byte status
//   'E' how it ended: RELEASED or ABORTED -> no answer
// The socket pair closes when the worker ends.
class AdoptedSCP : public DcmThreadSCP {
  public:
    AdoptedSCP(T_ASC_Association* association, int channel)
        : association_(association), channel_(channel) {}
    ~AdoptedSCP() override { close(channel_); }

  protected:
    void notifyAssociationRequest(const T_ASC_Parameters& params,
                                  DcmSCPActionType& action) override {
        DcmThreadSCP::notifyAssociationRequest(params, action);
        verdict_ = 3;  // no answer: refused (the front is gone)
        char answer = 3;
        if (send_message(channel_, 'Q',
                         {params.DULparams.callingAPTitle, params.DULparams.calledAPTitle,
                          params.DULparams.callingPresentationAddress}) &&
            recv(channel_, &answer, 1, MSG_WAITALL) == 1)
            verdict_ = answer;
        if (verdict_ == 3) action = DCMSCP_ACTION_REFUSE_ASSOCIATION;
    }
    OFBool checkCalledAETitleAccepted(const OFString&) override { return verdict_ != 1; }
    OFBool checkCallingAETitleAccepted(const OFString&) override { return verdict_ != 2; }
    void notifyAssociationAcknowledge() override { send_message(channel_, 'O', {}); }
    void notifyReleaseRequest() override { end_ = "RELEASED"; }
    void notifyAssociationTermination() override { send_message(channel_, 'E', {end_}); }

    OFCondition handleIncomingCommand(T_DIMSE_Message* message,
                                      const DcmPresentationContextInfo& info) override {
        if (message->CommandField != DIMSE_C_STORE_RQ)
            return DcmThreadSCP::handleIncomingCommand(message, info);
        T_DIMSE_C_StoreRQ& request = message->msg.CStoreRQ;
        std::string part = g_root + "/" + std::to_string(getpid()) + "-" +
                           std::to_string(g_counter++) + ".part";
        T_ASC_PresentationContextID id = info.presentationContextID;
        OFCondition received = receive_into(part, request, info);
        if (received.bad()) {
            unlink(part.c_str());
            return received;
        }
        return sendSTOREResponse(id, request, store_by_front(part, request));
    }

  private:
    T_ASC_Association* association_;
    int channel_;
    char verdict_ = 3;
    const char* end_ = "ABORTED";  // unless released

    // The dataset as it arrives, after a File Meta naming the node (not DCMTK), into *part*.
    OFCondition receive_into(const std::string& part, const T_DIMSE_C_StoreRQ& request,
                             const DcmPresentationContextInfo& info) {
        DcmOutputFileStream* stream = nullptr;
        T_ASC_PresentationContextID id = info.presentationContextID;
        OFCondition made =
            DIMSE_createFilestream(part.c_str(), &request, association_, id, OFFalse, &stream);
        if (made.bad()) return made;
        DcmMetaInfo meta;
        const Uint8 version[] = {0, 1};
        meta.putAndInsertUint8Array(DCM_FileMetaInformationVersion, version, 2);
        meta.putAndInsertString(DCM_MediaStorageSOPClassUID, request.AffectedSOPClassUID);
        meta.putAndInsertString(DCM_MediaStorageSOPInstanceUID, request.AffectedSOPInstanceUID);
        meta.putAndInsertString(DCM_TransferSyntaxUID, info.acceptedTransferSyntax.c_str());
        meta.putAndInsertString(DCM_ImplementationClassUID, g_implementation_uid.c_str());
        meta.putAndInsertString(DCM_ImplementationVersionName, g_implementation_version.c_str());
        meta.computeGroupLengthAndPadding(EGL_withGL, EPD_noChange, META_HEADER_DEFAULT_TRANSFERSYNTAX,
                                          EET_ExplicitLength);
        meta.transferInit();
        OFCondition written = meta.write(*stream, META_HEADER_DEFAULT_TRANSFERSYNTAX,
                                         EET_ExplicitLength, nullptr);
        meta.transferEnd();
        if (written.good())
            written = DIMSE_receiveDataSetInFile(association_, DIMSE_NONBLOCKING,
                                                 getConfig().getDIMSETimeout(), &id, stream,
                                                 nullptr, nullptr);
        delete stream;
        return written;
    }

    // The front stores the file (or refuses it, and removes it either way) and says what to
    // answer; with --adopt-header DCMTK's reading of the header goes along.
    Uint16 store_by_front(const std::string& part, const T_DIMSE_C_StoreRQ& request) {
        std::vector<std::string> read;
        Header h;
        if (g_header && read_header(part, h))  // else the front reads the file itself
            for (const OFString& field : {h.study, h.series, h.sop, h.sop_class, h.syntax,
                                          h.modality, h.body_part, h.description, h.accession,
                                          h.date})
                read.emplace_back(field.c_str());
        uint16_t status = 0;
        if (!send_message(channel_, 'S',
                          {part.c_str(), request.AffectedSOPClassUID,
                           request.AffectedSOPInstanceUID},
                          read) ||
            recv(channel_, &status, 2, MSG_WAITALL) != 2) {
            unlink(part.c_str());  // the front gone: nothing was placed
            return STATUS_STORE_Refused_OutOfResources;
        }
        return status;
    }
};

void configure(DcmSCPConfig& config) {
    config.setAETitle("DURABLE_SCP");
    config.setMaxReceivePDULength(ASC_MAXIMUMPDUSIZE);
    config.setConnectionBlockingMode(DUL_NOBLOCK);
    config.setHostLookupEnabled(OFFalse);
    OFList<OFString> syntaxes;
    syntaxes.push_back(UID_LittleEndianExplicitTransferSyntax);
    syntaxes.push_back(UID_LittleEndianImplicitTransferSyntax);
    syntaxes.push_back(UID_JPEGProcess14SV1TransferSyntax);
    syntaxes.push_back(UID_JPEG2000LosslessOnlyTransferSyntax);
    syntaxes.push_back(UID_RLELosslessTransferSyntax);
    OFList<OFString> verification;
    verification.push_back(UID_LittleEndianImplicitTransferSyntax);
    config.addPresentationContext(UID_VerificationSOPClass, verification);
    for (int i = 0; i < numberOfDcmAllStorageSOPClassUIDs; ++i)
        config.addPresentationContext(dcmAllStorageSOPClassUIDs[i], syntaxes);
}

// One accepted connection and its socket pair end, passed by the front (SCM_RIGHTS).
bool receive_connection(int control, int fds[2]) {
    char byte = 0;
    iovec data{&byte, 1};
    alignas(cmsghdr) char space[CMSG_SPACE(2 * sizeof(int))];
    msghdr message{};
    message.msg_iov = &data;
    message.msg_iovlen = 1;
    message.msg_control = space;
    message.msg_controllen = sizeof(space);
    if (recvmsg(control, &message, MSG_CMSG_CLOEXEC) != 1) return false;
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    if (header == nullptr || header->cmsg_type != SCM_RIGHTS ||
        header->cmsg_len != CMSG_LEN(2 * sizeof(int)))
        return false;
    std::memcpy(fds, CMSG_DATA(header), 2 * sizeof(int));
    return true;
}

// --adopt: take over each connection the front passes, one worker thread per association.
int adopt(const char* control_path, const DcmSCPConfig& config) {
    int control = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::snprintf(address.sun_path, sizeof(address.sun_path), "%s", control_path);
    if (connect(control, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) return 1;
    DcmSharedSCPConfig shared(config);
    // An acceptor network without a listening socket of its own: DCMTK makes none while an
    // external socket is set (its inetd mode); each connection's socket is set in turn below.
    T_ASC_Network* network = nullptr;
    dcmExternalSocketHandle.set(control);
    OFCondition made = ASC_initializeNetwork(NET_ACCEPTOR, 0, 30, &network);
    dcmExternalSocketHandle.set(-1);
    if (made.bad()) return 1;
    int fds[2];
    while (receive_connection(control, fds)) {  // until the front goes
        T_ASC_Association* association = nullptr;
        dcmExternalSocketHandle.set(fds[0]);  // only this thread receives associations
        OFCondition received = ASC_receiveAssociation(
            network, &association, ASC_MAXIMUMPDUSIZE, nullptr, nullptr, OFFalse, DUL_NOBLOCK, 30);
        dcmExternalSocketHandle.set(-1);
        if (received.bad()) {  // the connection is the association's: dropping it closes it
            if (association != nullptr) {
                ASC_dropAssociation(association);
                ASC_destroyAssociation(&association);
            } else {
                close(fds[0]);
            }
            close(fds[1]);
            continue;
        }
        // The node's identity in the A-ASSOCIATE-AC, not DCMTK's.
        OFStandard::strlcpy(association->params->ourImplementationClassUID,
                            g_implementation_uid.c_str(), sizeof(DIC_UI));
        OFStandard::strlcpy(association->params->ourImplementationVersionName,
                            g_implementation_version.c_str(), sizeof(DIC_SH));
        int channel = fds[1];
        std::thread([association, channel, shared] {
            AdoptedSCP worker(association, channel);
            worker.setSharedConfig(shared);
            worker.run(association);  // negotiates, serves, drops and frees the association
        }).detach();
    }
    ASC_dropNetwork(&network);
    return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
    OFLog::configure(OFLogger::ERROR_LOG_LEVEL);  // not the header read's stop at Pixel Data
    if ((argc == 4 || argc == 8) && (std::strcmp(argv[1], "--adopt") == 0 ||
                                     std::strcmp(argv[1], "--adopt-header") == 0)) {
        g_header = std::strcmp(argv[1], "--adopt-header") == 0;
        g_root = argv[3];
        DcmSCPConfig config;
        configure(config);
        if (argc == 8) {
            config.setAETitle(argv[4]);
            g_implementation_uid = argv[5];
            g_implementation_version = argv[6];
            config.setDIMSEBlockingMode(DIMSE_NONBLOCKING);  // an idle association ends after
            config.setDIMSETimeout(static_cast<Uint32>(std::atoi(argv[7])));  // this long
        }
        return adopt(argv[2], config);
    }
    if (argc != 3 && argc != 4) {
        std::fprintf(stderr,
                     "usage: durable_scp PORT DIRECTORY [RECORDER_SOCKET]\n"
                     "       durable_scp --adopt|--adopt-header CONTROL_SOCKET INCOMING_DIR\n"
                     "           [AE_TITLE IMPLEMENTATION_CLASS_UID VERSION_NAME IDLE_SECONDS]\n");
        return 2;
    }
    g_root = argv[2];
    if (argc == 4) g_recorder = argv[3];
    mkdir((g_root + "/incoming").c_str(), 0700);
    mkdir((g_root + "/spool").c_str(), 0700);
    sqlite3* db = nullptr;
    if (sqlite3_open((g_root + "/index.sqlite").c_str(), &db) != SQLITE_OK ||
        sqlite3_exec(db, "PRAGMA journal_mode=WAL;", nullptr, nullptr, nullptr) != SQLITE_OK ||
        sqlite3_exec(db, SCHEMA, nullptr, nullptr, nullptr) != SQLITE_OK)
        return 1;
    sqlite3_close(db);

    DcmSCPPool<DurableSCP> pool;
    pool.setMaxThreads(32);
    DcmSCPConfig& config = pool.getConfig();
    config.setPort(static_cast<Uint16>(std::atoi(argv[1])));
    configure(config);
    OFCondition result = pool.listen();
    std::fprintf(stderr, "durable_scp: %s\n", result.text());
    return result.good() ? 0 : 1;
}
