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

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcfilefo.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/scppool.h>
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

namespace {

std::string g_root;
std::string g_recorder;  // empty: rows written here
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

}  // namespace

int main(int argc, char* argv[]) {
    OFLog::configure(OFLogger::ERROR_LOG_LEVEL);  // not the header read's stop at Pixel Data
    if (argc != 3 && argc != 4) {
        std::fprintf(stderr,
                     "usage: durable_scp PORT DIRECTORY [RECORDER_SOCKET]\n");
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
