// triage-node's DCMTK transport (dicom.transport = "dcmtk"): the DICOM Upper Layer and DIMSE
// of a receiver process served by DCMTK's dcmnet instead of pynetdicom. Built by
// triage_node.dicom.native.build; started and driven by triage_node.dicom.native.handover.
//
// It listens on no port. The receiver process (Python) accepts each connection, admits it
// (address allow-list, per-address and total limits, the deadline for a complete
// A-ASSOCIATE-RQ) and passes the socket, with one end of a socket pair, over the control
// socket this program inherited from it (descriptor CONTROL_FD; SCM_RIGHTS). The association
// is taken over from the passed socket (dcmExternalSocketHandle set around
// ASC_receiveAssociation, as DCMTK's inetd mode does) and served by a worker thread (Worker),
// which asks the receiver process over its socket pair, in order:
//   'Q' calling AE, called AE, peer address -> 1 byte: 0 accept, 1 called AE title not
//       recognised, 2 calling AE title not recognised (refused with that reason)
//   'O' the association was accepted -> no answer (recorded there)
//   'S' received file, Affected SOP Class UID, Affected SOP Instance UID and the header fields
//       read here (none when they could not be read) -> the 2-byte status to answer, and the
//       Error Comment's 2-byte length and text
//   'E' how it ended: RELEASED or ABORTED -> no answer (recorded there; the settle doorbell)
// Each message is a type byte and NUL-terminated fields after a 4-byte little-endian length.
// The socket pair closes when the worker ends. Everything the node decides and records (the
// checks, the fsync and placement, the committed rows, the logs) stays in the receiver
// process; this program only moves bytes and answers what it is told.
//
// Each dataset is written as it arrives into INCOMING_DIR (the spool's incoming directory)
// behind a File Meta that names the node, whose Implementation Class UID and Version Name the
// A-ASSOCIATE-AC carries too. An association idle for NETWORK_TIMEOUT seconds is released.
//
//     dcmtk-receiver CONTROL_FD INCOMING_DIR AE_TITLE IMPLEMENTATION_CLASS_UID
//         IMPLEMENTATION_VERSION_NAME ACSE_TIMEOUT DIMSE_TIMEOUT NETWORK_TIMEOUT MAX_PDU
//         TRANSFER_SYNTAXES ABSTRACT_SYNTAXES
// (the last two: comma-separated UIDs; every abstract syntax is accepted in any of the
// transfer syntaxes, in the order the requestor proposed them)
//
// It ends when the control socket closes and its last association has ended, and with its
// parent (PR_SET_PDEATHSIG).

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcfilefo.h>
#include <dcmtk/dcmdata/dcmetinf.h>
#include <dcmtk/dcmdata/dcostrmf.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/scpthrd.h>
#include <dcmtk/oflog/oflog.h>

#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Settings {
    std::string incoming;
    std::string implementation_uid;
    std::string implementation_version;
    Uint32 max_pdu = ASC_MAXIMUMPDUSIZE;
    int acse_timeout = 30;
    int dimse_timeout = 30;  // while a dataset arrives
    std::vector<std::string> transfer_syntaxes;
    std::set<std::string> abstract_syntaxes;
};

Settings g_settings;
std::atomic<unsigned long> g_counter{0};
std::atomic<int> g_workers{0};  // associations being served

std::vector<std::string> split(const std::string& text) {
    std::vector<std::string> parts;
    std::string::size_type start = 0;
    while (start <= text.size()) {
        std::string::size_type end = text.find(',', start);
        if (end == std::string::npos) end = text.size();
        if (end > start) parts.push_back(text.substr(start, end - start));
        start = end + 1;
    }
    return parts;
}

// One message to the receiver process; false when it is gone.
bool send_message(int channel, char type, const std::vector<std::string>& fields) {
    std::string message(4, '\0');
    message.push_back(type);
    for (const std::string& field : fields) {
        message.append(field.c_str());  // up to an embedded NUL: DICOM strings have none
        message.push_back('\0');
    }
    uint32_t length = static_cast<uint32_t>(message.size() - 4);
    std::memcpy(&message[0], &length, 4);
    return send(channel, message.data(), message.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(message.size());
}

// The header fields the node keeps, in the order of its InstanceHeader (Study, Series and SOP
// Instance UIDs, SOP Class UID, Transfer Syntax UID, Modality, Body Part Examined, Series
// Description, Accession Number, Study Date), read up to Pixel Data. Empty when the file
// cannot be read, a value is not ASCII (its Specific Character Set decides what it says) or
// an element has several values: the receiver process then reads the file itself (pydicom),
// as its other transport does, and answers its status.
std::vector<std::string> read_header(const std::string& part) {
    DcmFileFormat file;
    if (file.loadFileUntilTag(part.c_str(), EXS_Unknown, EGL_noChange, DCM_MaxReadLength,
                              ERM_autoDetect, DCM_PixelData)
            .bad())
        return {};
    DcmDataset* data = file.getDataset();
    std::vector<std::string> fields;
    for (const DcmTagKey& key :
         {DCM_StudyInstanceUID, DCM_SeriesInstanceUID, DCM_SOPInstanceUID, DCM_SOPClassUID,
          DCM_Modality, DCM_BodyPartExamined, DCM_SeriesDescription, DCM_AccessionNumber,
          DCM_StudyDate}) {
        OFString value;
        data->findAndGetOFStringArray(key, value);
        for (char c : value)
            if (static_cast<unsigned char>(c) >= 0x80 || c == 0x1b || c == '\\')
                return {};  // its character set (or its values) decide: pydicom reads it
        fields.emplace_back(value.c_str());
    }
    OFString syntax;
    file.getMetaInfo()->findAndGetOFString(DCM_TransferSyntaxUID, syntax);
    fields.insert(fields.begin() + 4, syntax.c_str());  // after the SOP Class UID
    return fields;
}

class Worker : public DcmThreadSCP {
  public:
    Worker(T_ASC_Association* association, int channel)
        : association_(association), channel_(channel) {}
    ~Worker() override { close(channel_); }

  protected:
    void notifyAssociationRequest(const T_ASC_Parameters& params,
                                  DcmSCPActionType& action) override {
        DcmThreadSCP::notifyAssociationRequest(params, action);
        char answer = 3;  // no answer: the receiver process is gone, refuse
        if (!send_message(channel_, 'Q',
                          {params.DULparams.callingAPTitle, params.DULparams.calledAPTitle,
                           params.DULparams.callingPresentationAddress}) ||
            recv(channel_, &answer, 1, MSG_WAITALL) != 1)
            answer = 3;
        verdict_ = answer;
        if (verdict_ != 0 && verdict_ != 1 && verdict_ != 2)
            action = DCMSCP_ACTION_REFUSE_ASSOCIATION;
    }
    // Each proposed context whose abstract syntax the node accepts gets the first of its
    // proposed transfer syntaxes that the node accepts too (the requestor's order, as
    // pynetdicom negotiates); the others are refused with the reason that applies.
    OFCondition negotiateAssociation() override {
        T_ASC_Parameters* params = association_->params;
        for (int i = 0; i < ASC_countPresentationContexts(params); ++i) {
            T_ASC_PresentationContext context;
            OFCondition found = ASC_getPresentationContext(params, i, &context);
            if (found.bad()) return found;
            OFCondition answered = EC_Normal;
            if (g_settings.abstract_syntaxes.count(context.abstractSyntax) == 0) {
                answered = ASC_refusePresentationContext(params, context.presentationContextID,
                                                         ASC_P_ABSTRACTSYNTAXNOTSUPPORTED);
            } else {
                const char* chosen = nullptr;
                for (int t = 0; t < context.transferSyntaxCount && chosen == nullptr; ++t)
                    for (const std::string& ours : g_settings.transfer_syntaxes)
                        if (ours == context.proposedTransferSyntaxes[t]) {
                            chosen = context.proposedTransferSyntaxes[t];
                            break;
                        }
                answered = chosen != nullptr
                               ? ASC_acceptPresentationContext(
                                     params, context.presentationContextID, chosen)
                               : ASC_refusePresentationContext(
                                     params, context.presentationContextID,
                                     ASC_P_TRANSFERSYNTAXESNOTSUPPORTED);
            }
            if (answered.bad()) return answered;
        }
        return EC_Normal;
    }
    OFBool checkCalledAETitleAccepted(const OFString&) override { return verdict_ != 1; }
    OFBool checkCallingAETitleAccepted(const OFString&) override { return verdict_ != 2; }
    void notifyAssociationAcknowledge() override { send_message(channel_, 'O', {}); }
    void notifyReleaseRequest() override { end_ = "RELEASED"; }
    void notifyAssociationTermination() override { send_message(channel_, 'E', {end_}); }

    // An association idle for the network timeout is released (A-RELEASE-RQ), as the node's
    // pynetdicom transport does, rather than aborted (DcmSCP's way, which follows this).
    void notifyDIMSEError(const OFCondition& condition) override {
        if (condition == DIMSE_NODATAAVAILABLE) {
            if (ASC_releaseAssociation(association_).good()) end_ = "RELEASED";
            return;
        }
        std::fprintf(stderr, "association aborted: %s\n", condition.text());
    }

    OFCondition handleIncomingCommand(T_DIMSE_Message* message,
                                      const DcmPresentationContextInfo& info) override {
        if (message->CommandField != DIMSE_C_STORE_RQ)
            return DcmThreadSCP::handleIncomingCommand(message, info);  // C-ECHO
        T_DIMSE_C_StoreRQ& request = message->msg.CStoreRQ;
        std::string part = g_settings.incoming + "/dcmtk-" + std::to_string(getpid()) + "-" +
                           std::to_string(g_counter++) + ".part";
        OFCondition received = receive_into(part, request, info);
        if (received.bad()) {
            unlink(part.c_str());  // never answered: nothing keeps it
            return received;
        }
        std::string comment;
        Uint16 status = stored(part, request, comment);
        if (comment.empty()) return sendSTOREResponse(info.presentationContextID, request, status);
        DcmDataset detail;  // its Error Comment goes into the response's command set
        detail.putAndInsertString(DCM_ErrorComment, comment.c_str());
        return sendSTOREResponse(info.presentationContextID, request.MessageID,
                                 request.AffectedSOPClassUID, request.AffectedSOPInstanceUID,
                                 status, &detail);
    }

  private:
    T_ASC_Association* association_;
    int channel_;
    char verdict_ = 3;
    const char* end_ = "ABORTED";  // unless released

    // The dataset as it arrives, after a File Meta naming the node, into *part*.
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
        meta.putAndInsertString(DCM_ImplementationClassUID,
                                g_settings.implementation_uid.c_str());
        meta.putAndInsertString(DCM_ImplementationVersionName,
                                g_settings.implementation_version.c_str());
        meta.computeGroupLengthAndPadding(EGL_withGL, EPD_noChange,
                                          META_HEADER_DEFAULT_TRANSFERSYNTAX, EET_ExplicitLength);
        meta.transferInit();
        OFCondition written = meta.write(*stream, META_HEADER_DEFAULT_TRANSFERSYNTAX,
                                         EET_ExplicitLength, nullptr);
        meta.transferEnd();
        if (written.good())
            written = DIMSE_receiveDataSetInFile(association_, DIMSE_NONBLOCKING,
                                                 g_settings.dimse_timeout, &id, stream,
                                                 nullptr, nullptr);
        delete stream;
        if (written.good() && id != info.presentationContextID)
            written = DIMSE_BADDATA;  // the dataset came on another context than its command
        return written;
    }

    // The receiver process stores the file (or refuses it; it removes it either way) and says
    // what to answer: the status, and an Error Comment (2-byte length, then the text); an
    // answer that never comes is "out of resources" (the peer sends again).
    Uint16 stored(const std::string& part, const T_DIMSE_C_StoreRQ& request,
                  std::string& comment) {
        std::vector<std::string> fields = {part, request.AffectedSOPClassUID,
                                           request.AffectedSOPInstanceUID};
        for (std::string& field : read_header(part)) fields.push_back(std::move(field));
        uint16_t answer[2] = {0, 0};
        char text[64];
        if (!send_message(channel_, 'S', fields) ||
            recv(channel_, answer, 4, MSG_WAITALL) != 4 || answer[1] > sizeof(text) ||
            (answer[1] > 0 &&
             recv(channel_, text, answer[1], MSG_WAITALL) != static_cast<ssize_t>(answer[1]))) {
            unlink(part.c_str());
            return STATUS_STORE_Refused_OutOfResources;
        }
        comment.assign(text, answer[1]);
        return answer[0];
    }
};

// One accepted connection and its socket pair end, passed over *control* (SCM_RIGHTS).
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

// Take over each connection passed, one worker thread per association, until the control
// socket closes.
int serve(int control, const DcmSCPConfig& config) {
    DcmSharedSCPConfig shared(config);
    // An acceptor network without a listening socket of its own: DCMTK makes none while an
    // external socket is set; each connection's socket is set in turn below.
    T_ASC_Network* network = nullptr;
    dcmExternalSocketHandle.set(control);
    OFCondition made =
        ASC_initializeNetwork(NET_ACCEPTOR, 0, g_settings.acse_timeout, &network);
    dcmExternalSocketHandle.set(-1);
    if (made.bad()) {
        std::fprintf(stderr, "cannot initialise the network: %s\n", made.text());
        return 1;
    }
    int fds[2];
    while (receive_connection(control, fds)) {
        T_ASC_Association* association = nullptr;
        dcmExternalSocketHandle.set(fds[0]);  // only this thread receives associations
        // The request is whole already (the receiver process waited for it), so this does
        // not block for long.
        OFCondition received =
            ASC_receiveAssociation(network, &association, g_settings.max_pdu, nullptr, nullptr,
                                   OFFalse, DUL_NOBLOCK, g_settings.acse_timeout);
        dcmExternalSocketHandle.set(-1);
        if (received.bad()) {  // the connection is the association's: dropping it closes it
            if (association != nullptr) {
                ASC_dropAssociation(association);
                ASC_destroyAssociation(&association);
            } else {
                close(fds[0]);
            }
            close(fds[1]);  // the receiver process frees the slot
            continue;
        }
        OFStandard::strlcpy(association->params->ourImplementationClassUID,
                            g_settings.implementation_uid.c_str(), sizeof(DIC_UI));
        OFStandard::strlcpy(association->params->ourImplementationVersionName,
                            g_settings.implementation_version.c_str(), sizeof(DIC_SH));
        int channel = fds[1];
        ++g_workers;
        std::thread([association, channel, shared] {
            {
                Worker worker(association, channel);
                worker.setSharedConfig(shared);
                worker.run(association);  // negotiates, serves, drops and frees it
            }
            --g_workers;
        }).detach();
    }
    // The receiver process is stopping: the associations in progress carry on to their end
    // (it cuts them off after its grace period).
    while (g_workers > 0) usleep(50000);
    ASC_dropNetwork(&network);
    return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the receiver process
    if (getppid() == 1) return 1;      // it died before the line above
    signal(SIGPIPE, SIG_IGN);
    if (argc != 12) {
        std::fprintf(stderr,
                     "usage: dcmtk-receiver CONTROL_FD INCOMING_DIR AE_TITLE "
                     "IMPLEMENTATION_CLASS_UID IMPLEMENTATION_VERSION_NAME ACSE_TIMEOUT "
                     "DIMSE_TIMEOUT NETWORK_TIMEOUT MAX_PDU TRANSFER_SYNTAXES "
                     "ABSTRACT_SYNTAXES\n");
        return 2;
    }
    // DCMTK's own log: errors only (its informational lines name AE titles and UIDs).
    OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
    g_settings.incoming = argv[2];
    g_settings.implementation_uid = argv[4];
    g_settings.implementation_version = argv[5];
    g_settings.acse_timeout = std::max(1, std::atoi(argv[6]));
    // DCMTK offers 4 KiB to 128 KiB; 0 (the node's "unlimited") is its largest.
    long long max_pdu = std::atoll(argv[9]);
    if (max_pdu > 0)
        g_settings.max_pdu = static_cast<Uint32>(std::min<long long>(
            std::max<long long>(max_pdu, ASC_MINIMUMPDUSIZE), ASC_MAXIMUMPDUSIZE));

    DcmSCPConfig config;
    config.setAETitle(argv[3]);
    config.setMaxReceivePDULength(g_settings.max_pdu);
    config.setConnectionBlockingMode(DUL_NOBLOCK);
    config.setACSETimeout(static_cast<Uint32>(g_settings.acse_timeout));
    config.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
    // Between commands the network timeout applies (an idle association is released); while
    // a dataset arrives, the DIMSE timeout (receive_into).
    config.setDIMSETimeout(static_cast<Uint32>(std::max(1, std::atoi(argv[8]))));
    config.setHostLookupEnabled(OFFalse);
    g_settings.dimse_timeout = std::max(1, std::atoi(argv[7]));
    g_settings.transfer_syntaxes = split(argv[10]);
    for (const std::string& uid : split(argv[11])) g_settings.abstract_syntaxes.insert(uid);
    int control = std::atoi(argv[1]);
    if (control <= 2 || send(control, "R", 1, MSG_NOSIGNAL) != 1) {  // ready
        std::fprintf(stderr, "no control socket at descriptor %s\n", argv[1]);
        return 1;
    }
    return serve(control, config);
}
